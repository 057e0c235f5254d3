"""Suite-wide guards: the compiled build under test is the current source (D17)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from softswitch import native

ROOT = Path(__file__).resolve().parent.parent


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test stale extensions, and under CI insist on the compiled build.

    Python imports `foo.*.so` in preference to `foo.py`, so an extension older than its source
    would have the tests pass or fail on code that is no longer there. Under CI the compiled
    build is what ships (the Dockerfile and `pip install .` compile it), so that is what must
    pass; elsewhere a pure-Python run (SOFTSWITCH_PURE=1 scripts/setup.sh) is fine.
    """
    stale = native.stale_extensions(ROOT)
    if stale:
        raise pytest.UsageError(
            "compiled modules older than their source (run scripts/setup.sh to rebuild, or "
            f"SOFTSWITCH_PURE=1 scripts/setup.sh to drop them): {', '.join(stale)}"
        )
    compiled = native.compiled_modules()
    if os.environ.get("CI") and not os.environ.get("SOFTSWITCH_PURE"):
        missing = sorted(set(native.module_names()) - set(compiled))
        if missing:
            raise pytest.UsageError(f"CI tests the compiled build, but these are Python: {missing}")


def pytest_report_header(config: pytest.Config) -> str:
    compiled, listed = native.compiled_modules(), native.module_names()
    return f"softswitch native build: {len(compiled)} of {len(listed)} modules compiled"
