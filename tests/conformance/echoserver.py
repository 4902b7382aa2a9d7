# Python 2.7: the reference echo upstream for the conformance run.
#
# It is the server `wstest -m echoserver` runs (autobahntestsuite's
# EchoServerFactory), with differences that concern only how it is started:
#
# - wstest binds every interface; this binds 127.0.0.1 only, on port 0, and
#   prints the port the kernel chose ("PORT <n>"), so run.sh never races
#   another process for a free port;
# - failByDrop is off unless --fail-by-drop is given. Autobahn's server
#   default (True) fails a connection (invalid UTF-8, bad close code, ...) by
#   resetting TCP without a close frame. The suite accepts that from a server
#   it talks to directly, but behind a proxy the reset reaches only the
#   proxy, which must then close the client with a code of its own (1011):
#   the verdicts would compare the two peers' ways of failing, not the relay.
#   With failByDrop off the upstream fails connections the way RFC 6455 asks
#   (a close frame with 1002/1007, then TCP), which is also how the suite's
#   own fuzzing client and server are configured ("spec conformance").
import sys

from autobahntestsuite import choosereactor  # noqa: F401  (must come first)
from twisted.internet import reactor
from autobahn.twisted.websocket import listenWS
from autobahntestsuite.echo import EchoServerFactory


def main():
    factory = EchoServerFactory("ws://127.0.0.1:0")
    if "--fail-by-drop" not in sys.argv[1:]:
        factory.setProtocolOptions(failByDrop=False)
    port = listenWS(factory, interface="127.0.0.1").getHost().port
    # What `-w ws://127.0.0.1:<port>` would have set: the server then checks
    # that the Host header the proxy sends upstream names this port.
    factory.port = factory.externalPort = port
    sys.stdout.write("PORT %d failByDrop=%s\n" % (port, factory.failByDrop))
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
