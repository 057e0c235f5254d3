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
        self._failed: set[str] = set()
        try:
            super().run()
        except Exception as exc:  # the compiler's errors come as several unrelated types
            self.warn(f"softswitch: native build failed, installing pure Python: {exc}")
            return
        if self.inplace:
            self._touch_built()

    def build_extension(self, ext: Any) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._failed.add(ext.name)
            self.warn(f"softswitch: could not compile {ext.name}, it stays Python: {exc}")

    def _touch_built(self) -> None:
        """Mark every extension built in place as newer than its source.

        A module's code is in its group's shared library; its own extension is a small shim
        whose C text changes only with the module's name, so setuptools skips it as up to
        date and leaves the old file, older than the edited source. The stale-extension check
        (softswitch/native.py) would then refuse a build that is in fact current.
        """
        for ext in self.extensions:
            path = Path(self.get_ext_fullpath(ext.name))
            if ext.name not in self._failed and path.exists():
                path.touch()


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
    return list(mypycify(paths, opt_level="3", separate=groups))


setup(ext_modules=native_extensions(), cmdclass={"build_ext": OptionalBuildExt})
