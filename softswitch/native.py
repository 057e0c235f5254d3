"""Which modules the build compiles with mypyc, and which of them this process runs compiled.

The list lives here, not in setup.py alone, so that the service can say at start-up whether it
runs the compiled build (an operator comparing two machines' CPU needs to know) and the tests
can insist on it under CI, where the compiled build is the one that ships (D17).

Chosen: the sans-I/O message path that every SIP message crosses (parser, transactions, digest,
registrar, dispatch), the call set-up around it, the B2BUA with call control, and the RTP
relay's packet path (endpoint sockets, bridge forwarders, the epoll dispatch: D14). Left as
Python: the asyncio edges (transports, store thread, HTTP, logging, CLI), whose cost is in
system calls, and the media manager (media/relay.py: control path only, and its tests replace
`_bind`). Tests may subclass or patch only what is left as Python.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

_SIP = [
    "dialog",
    "digest",
    "errorreply",
    "errors",
    "framing",
    "headers",
    "message",
    "randoms",
    "syntax",
    "timers",
    "transaction",
    "transaction_layer",
    "uri",
]
_CORE = [
    "dialplan/routing.py",
    "softswitch/appearances.py",
    "softswitch/call_model.py",
    "softswitch/call_setup.py",
    "softswitch/dialog_info.py",
    "softswitch/lines.py",
    "softswitch/logline.py",
    "softswitch/directory.py",
    "softswitch/overload.py",
    "softswitch/registrar.py",
    "softswitch/sca.py",
    "softswitch/service.py",
    "softswitch/stateless.py",
    "softswitch/store/records.py",
    "softswitch/subscriptions.py",
    "softswitch/throttle.py",
    "softswitch/udp.py",
    "media/negotiation.py",
    "media/ptmap.py",
    "media/sdp.py",
]
# The RTP packet path: recv -> on_packet -> the other leg's send, 100,000 times a second.
_MEDIA = [
    "media/bridge.py",
    "media/endpoint.py",
    "media/poller.py",
    "media/ports.py",
    "media/relay.py",
]

_CALLS = [
    "softswitch/call_control.py",
    "softswitch/calls.py",
    "softswitch/late_offer.py",
    "softswitch/takeover.py",
    "softswitch/transfer.py",
]

# (shared library name, source paths relative to the project root); one gcc job per group.
NATIVE_GROUPS: list[tuple[str, list[str]]] = [
    ("softswitch_sip", [f"softswitch/sip/{name}.py" for name in _SIP]),
    ("softswitch_core", _CORE),
    ("softswitch_calls", _CALLS),
    ("softswitch_media", _MEDIA),
]


def module_names() -> list[str]:
    """The dotted names of every module the build compiles."""
    return [p.removesuffix(".py").replace("/", ".") for _, group in NATIVE_GROUPS for p in group]


def compiled_modules() -> list[str]:
    """Those of `module_names` that this interpreter imported from a compiled extension."""
    found = []
    for name in module_names():
        origin = getattr(importlib.import_module(name), "__file__", None) or ""
        if not origin.endswith(".py"):
            found.append(name)
    return found


def missing_extensions(root: Path) -> list[str]:
    """Modules of the list with no compiled extension beside their source."""
    missing = []
    for name in module_names():
        source = root / (name.replace(".", "/") + ".py")
        if not any(source.parent.glob(source.stem + ".*.so")):
            missing.append(name)
    return missing


def stale_extensions(root: Path) -> list[str]:
    """Compiled extensions in the source tree that are older than their source.

    Python imports a module's extension in preference to its .py file, so after an edit a
    stale extension would silently run the old code. Checked by the test suite's start.
    """
    stale = []
    for name in module_names():
        source = root / (name.replace(".", "/") + ".py")
        for ext in source.parent.glob(source.stem + ".*.so"):
            if ext.stat().st_mtime < source.stat().st_mtime:
                stale.append(str(ext.relative_to(root)))
    return stale


def main(argv: list[str]) -> int:
    """`python -m softswitch.native --check`: exit 1 when the in-place build is due.

    scripts/setup.sh asks this before running the 1-minute compile, so an unchanged tree is
    not rebuilt and an edited one always is.
    """
    root = Path(__file__).resolve().parent.parent
    if argv != ["--check"]:
        print("usage: python -m softswitch.native --check", file=sys.stderr)
        return 2
    due = missing_extensions(root) + stale_extensions(root)
    for item in due:
        print(f"native build due: {item}", file=sys.stderr)
    return 1 if due else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
