"""Runs LabOrchestrator's own token code for the Rust tests (tests/support/labo.rs).

    python labo.py mint '{"user_id": 5, "lab_id": 1, ..., "secret_key": "...", "expires_in": 600}'
    python labo.py decode '{"token": "...", "secret_key": "...", "algorithms": ["HS256"]}'

Run with the interpreter of a virtualenv made by setup.sh: it calls whichever version of
lab-orchestrator-lib-auth that virtualenv holds, passing only the arguments the caller gave
(0.0.5 takes no algorithm, expires_at or additional_data; 2.x does). `mint` prints the token;
`decode` prints the library's answer as JSON ({"ok": false, "error": ...} when it refuses).
"""

import dataclasses
import json
import sys

from lab_orchestrator_lib_auth import __version__
from lab_orchestrator_lib_auth.auth import (
    LabInstanceTokenParams,
    decode_auth_token,
    generate_auth_token,
)


def mint(spec):
    params = {
        "lab_id": spec["lab_id"],
        "lab_instance_id": spec["lab_instance_id"],
        "namespace_name": spec["namespace_name"],
        "allowed_vmi_names": spec["allowed_vmi_names"],
    }
    if "additional_data" in spec:
        params["additional_data"] = spec["additional_data"]
    kwargs = {k: spec[k] for k in ("expires_in", "expires_at", "algorithm") if k in spec}
    token = generate_auth_token(
        spec["user_id"], LabInstanceTokenParams(**params), spec["secret_key"], **kwargs
    )
    print(token)


def decode(spec):
    kwargs = {"algorithms": spec["algorithms"]} if "algorithms" in spec else {}
    try:
        data = decode_auth_token(spec["token"], spec["secret_key"], **kwargs)
    except Exception as e:  # 2.x raises PyJWT's errors
        print(json.dumps({"ok": False, "error": type(e).__name__ + ": " + str(e)}))
        return
    if data is None:  # 0.0.5 answers None for every refusal
        print(json.dumps({"ok": False, "error": "decode_auth_token returned None"}))
        return
    print(json.dumps({"ok": True, "version": __version__, "data": dataclasses.asdict(data)}))


if __name__ == "__main__":
    {"mint": mint, "decode": decode}[sys.argv[1]](json.loads(sys.argv[2]))
