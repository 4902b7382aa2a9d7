#!/usr/bin/env python3
"""Compare two Autobahn|Testsuite fuzzingclient reports case by case.

    compare.py DIRECT/index.json PROXIED/index.json [--markdown summary.md]
               [--known known-differences.txt]

Prints, per case category, how many cases got each verdict directly and
through the proxy, then every case whose verdict (`behavior`) or closing
verdict (`behaviorClose`) differs, with the suite's description and
expectation and what each side saw. Exits 1 when any verdict differs or a
case ran on one side only, 0 otherwise; with --known, differences listed in
that file (same case, same verdicts on both sides) are reported as known and
do not count. Python 3, standard library only.
"""

import argparse
import json
import os
import re
import sys

VERDICTS = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]
SHORT = {"OK": "OK", "NON-STRICT": "NS", "INFORMATIONAL": "INFO",
         "UNIMPLEMENTED": "UNIMPL", "FAILED": "FAILED"}
# The suite's own section names (autobahntestsuite/case/__init__.py).
CATEGORIES = {
    "1": "Framing", "2": "Pings/Pongs", "3": "Reserved Bits", "4": "Opcodes",
    "5": "Fragmentation", "6": "UTF-8 Handling", "7": "Close Handling",
    "9": "Limits/Performance", "10": "Misc", "12": "WebSocket Compression",
    "13": "WebSocket Compression",
}


def case_key(case_id):
    return tuple(int(p) for p in case_id.split("."))


def load_known(path):
    """{case id: ((direct behavior, close), (proxied behavior, close))}."""
    known = {}
    line_re = re.compile(r"^(\d+(?:\.\d+)*)\s+(\S+)/(.+?)\s*->\s*(\S+)/(.+?)\s*$")
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            m = line_re.match(line)
            if not m:
                sys.exit("%s:%d: expected 'CASE DIRECT/CLOSE -> PROXIED/CLOSE', got %r" % (path, n, line))
            known[m.group(1)] = ((m.group(2), m.group(3)), (m.group(4), m.group(5)))
    return known


def verdicts(summary):
    return (summary["behavior"], summary["behaviorClose"])


def load(path):
    """The one agent's {case id: summary} from an index.json."""
    with open(path) as f:
        index = json.load(f)
    if len(index) != 1:
        sys.exit("%s: expected one agent, found %s" % (path, sorted(index)))
    (agent, cases), = index.items()
    return agent, os.path.dirname(path), cases


def detail(report_dir, summary):
    """The per-case report (description, expectation, close codes)."""
    name = summary.get("reportfile")
    if not name:
        return {}
    try:
        with open(os.path.join(report_dir, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def counts(cases):
    table = {}
    for case_id, s in cases.items():
        cat = case_id.split(".")[0]
        row = table.setdefault(cat, {v: 0 for v in VERDICTS})
        row[s["behavior"]] = row.get(s["behavior"], 0) + 1
    return table


def plain(html):
    """The suite's descriptions are HTML fragments; one line of text."""
    text = re.sub(r"<br\s*/?>", " ", html)
    text = re.sub(r"</?[a-z]+>", "", text)
    return " ".join(text.split())


def side(summary, rep):
    """What one side saw, in one line."""
    parts = ["%s / close %s" % (summary["behavior"], summary["behaviorClose"])]
    parts.append("remote close code %s" % summary.get("remoteCloseCode"))
    if rep:
        parts.append("closed by %s" % ("the suite" if rep.get("closedByMe") else "the server"))
        parts.append("TCP dropped by %s" % ("the suite" if rep.get("droppedByMe") else "the server"))
        parts.append("%d ms" % summary.get("duration", 0))
        if rep.get("result"):
            parts.append("result: %s" % rep["result"])
        if rep.get("resultClose"):
            parts.append("close: %s" % rep["resultClose"])
    return "; ".join(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("direct")
    ap.add_argument("proxied")
    ap.add_argument("--markdown", help="also write the summary as markdown here")
    ap.add_argument("--known", help="differences that are understood (see known-differences.txt)")
    args = ap.parse_args()
    known = load_known(args.known) if args.known else {}

    d_agent, d_dir, direct = load(args.direct)
    p_agent, p_dir, proxied = load(args.proxied)
    dc, pc = counts(direct), counts(proxied)
    cats = sorted(set(dc) | set(pc), key=int)

    head = ["category"] + ["direct %s" % SHORT[v] for v in VERDICTS] + \
           ["proxied %s" % SHORT[v] for v in VERDICTS]
    rows = []
    total_d = {v: 0 for v in VERDICTS}
    total_p = {v: 0 for v in VERDICTS}
    for cat in cats:
        d = dc.get(cat, {v: 0 for v in VERDICTS})
        p = pc.get(cat, {v: 0 for v in VERDICTS})
        for v in VERDICTS:
            total_d[v] += d.get(v, 0)
            total_p[v] += p.get(v, 0)
        rows.append(["%s %s" % (cat, CATEGORIES.get(cat, ""))] +
                    [str(d.get(v, 0)) for v in VERDICTS] + [str(p.get(v, 0)) for v in VERDICTS])
    rows.append(["all (%d / %d cases)" % (len(direct), len(proxied))] +
                [str(total_d[v]) for v in VERDICTS] + [str(total_p[v]) for v in VERDICTS])

    diffs = []      # (case, direct, proxied, direct report, proxied report, known)
    gone = []       # known differences that did not occur in this run
    for case_id in sorted(set(direct) | set(proxied), key=case_key):
        d, p = direct.get(case_id), proxied.get(case_id)
        if d is None or p is None:
            diffs.append((case_id, d, p, {}, {}, False))
        elif verdicts(d) != verdicts(p):
            is_known = known.get(case_id) == (verdicts(d), verdicts(p))
            diffs.append((case_id, d, p, detail(d_dir, d), detail(p_dir, p), is_known))
        elif case_id in known:
            gone.append(case_id)
    unknown = [x for x in diffs if not x[5]]

    # Plain text for the terminal.
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    print(fmt(head))
    for r in rows:
        print(fmt(r))
    print()
    if diffs:
        print("%d case(s) whose verdict differs (%d known, %d not):"
              % (len(diffs), len(diffs) - len(unknown), len(unknown)))
        for case_id, d, p, dr, pr, is_known in diffs:
            desc = plain((pr or dr).get("description", ""))
            print("- %s%s: %s" % (case_id, " (known)" if is_known else "", desc))
            if (pr or dr).get("expectation"):
                print("    expected: %s" % plain((pr or dr)["expectation"]))
            print("    direct:  %s" % (side(d, dr) if d else "not run"))
            print("    proxied: %s" % (side(p, pr) if p else "not run"))
    else:
        print("no verdict differs: the %d cases got the same behavior and behaviorClose "
              "directly and through the proxy" % len(direct))
    if gone:
        print("listed as known but equal in this run: %s" % " ".join(gone))

    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("# Autobahn|Testsuite: direct vs through the proxy\n\n")
            f.write("Verdicts (`behavior`) per case category; agents `%s` and `%s`. NS: NON-STRICT, "
                    "INFO: INFORMATIONAL, UNIMPL: UNIMPLEMENTED.\n\n" % (d_agent, p_agent))
            f.write("| " + " | ".join(head) + " |\n")
            f.write("|---|" + "---:|" * (len(head) - 1) + "\n")
            for r in rows:
                f.write("| " + " | ".join(r) + " |\n")
            f.write("\n")
            if diffs:
                f.write("## Cases whose verdict differs (%d, %d of them known)\n\n"
                        % (len(diffs), len(diffs) - len(unknown)))
                for case_id, d, p, dr, pr, is_known in diffs:
                    f.write("- **%s**%s: %s\n" % (case_id, " (known)" if is_known else "",
                                                  plain((pr or dr).get("description", ""))))
                    if (pr or dr).get("expectation"):
                        f.write("  - expected: %s\n" % plain((pr or dr)["expectation"]))
                    f.write("  - direct: %s\n" % (side(d, dr) if d else "not run"))
                    f.write("  - proxied: %s\n" % (side(p, pr) if p else "not run"))
            else:
                f.write("No verdict differs.\n")
            if gone:
                f.write("\nListed as known but equal in this run: %s\n" % " ".join(gone))
    return 1 if unknown else 0


if __name__ == "__main__":
    sys.exit(main())
