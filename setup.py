"""Build hook: compiles the hot sans-I/O modules with mypyc (docs/decisions.md, D17).

Everything else about the distribution is in pyproject.toml. The modules below stay ordinary
Python source, type-checked by mypy; mypyc turns the same files into C extensions that the
import system prefers over the .py files next to them. The build is optional: without a C
compiler, without mypy, or with SOFTSWITCH_PURE=1 in the environment, the package installs as
pure Python and behaves the same, only slower.

Two groups are compiled as separate shared libraries so that `build_ext -j 2` can run gcc on
both cores (one group is one C file of ~250,000 lines: the compile, not mypyc, is the cost).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from softswitch.native import NATIVE_GROUPS  # noqa: E402  (a plain list; imports nothing)


class OptionalBuildExt(build_ext):
    """A failed compile leaves the pure-Python package instead of failing the install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # the compiler's errors come as several unrelated types
            self.warn(f"softswitch: native build failed, installing pure Python: {exc}")

    def build_extension(self, ext: Any) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self.warn(f"softswitch: could not compile {ext.name}, it stays Python: {exc}")
            return
        # mypycify has just generated every C file from the current source, so a built (or
        # skipped as up to date) extension is current. setuptools skips a module's small shim
        # when its C did not change, though (the code is in the group's library), and the
        # copy in place keeps the old time: the stale check (softswitch.native) would then
        # refuse an edited module forever. Date the output now; a failed one keeps its age.
        os.utime(self.get_ext_fullpath(ext.name))


def native_extensions() -> list[Any]:
    if os.environ.get("SOFTSWITCH_PURE"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("softswitch: mypy (mypyc) not available, installing pure Python", file=sys.stderr)
        return []
    os.chdir(ROOT)  # mypycify takes paths relative to the project
    groups = [(list(paths), name) for name, paths in NATIVE_GROUPS]
    paths = [p for _, group in NATIVE_GROUPS for p in group]
    try:
        return list(mypycify(paths, opt_level="3", separate=groups))
    except Exception as exc:
        # mypy's incremental cache has crashed mypyc's code generator after edits (a
        # ValueError in _emit_attr_bitmap_update); a cold cache has always worked, so
        # retry once from scratch before giving up on the native build.
        print(f"softswitch: mypyc failed ({exc!r}), retrying without its cache", file=sys.stderr)
        shutil.rmtree(ROOT / ".mypy_cache", ignore_errors=True)
    try:
        return list(mypycify(paths, opt_level="3", separate=groups))
    except Exception as exc:
        print(f"softswitch: mypyc failed again ({exc!r}), installing pure Python", file=sys.stderr)
        return []


setup(ext_modules=native_extensions(), cmdclass={"build_ext": OptionalBuildExt})
