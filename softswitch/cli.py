"""The `softswitch` command: `run` the service, `check-config` a YAML file.

uvloop is chosen here, once, for the whole process: the protocol code never cares which loop
runs it, and tests may use the stock one.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from dialplan import ConfigError, default_config_path, load_config

from . import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="softswitch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"softswitch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the service")
    run.add_argument("--config", type=Path, help="YAML config (default: the embedded demo config)")
    check = sub.add_parser("check-config", help="validate a config file and print its errors")
    check.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config(args.file)
    return run_service(args.config)


def check_config(path: Path) -> int:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return 1
    print(f"{path}: OK ({len(cfg.users)} users, {len(cfg.delegations)} delegations)")
    return 0


def run_service(config_path: Path | None) -> int:
    from . import logs
    from .service import Service, ServiceError

    embedded = config_path is None
    path = default_config_path() if config_path is None else config_path
    try:
        # The embedded default lives inside the package: its data_dir is relative to the cwd.
        cfg = load_config(path, data_dir_base=Path.cwd() if embedded else None)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return 1
    logs.configure(cfg.log.level, cfg.log.format)
    _raise_fd_limit()
    service = Service(cfg, path, data_dir_base=Path.cwd() if embedded else None)
    try:
        return _run(service.run_forever())
    except ServiceError as exc:
        print(f"softswitch: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


FD_LIMIT_WANTED = 65536


def _raise_fd_limit() -> None:
    """Lift the soft limit on open files towards the hard one.

    Each relayed call holds up to 8 sockets (RTP and RTCP for two legs, each with a connected
    twin once latched), so the usual soft limit of 1,024 would cap the service near 120 calls
    with EMFILE on bind. Raising the soft limit up to the hard one needs no privilege.
    """
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = FD_LIMIT_WANTED if hard == resource.RLIM_INFINITY else min(hard, FD_LIMIT_WANTED)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (OSError, ValueError):  # pragma: no cover - a sandbox that forbids it
        pass


def _run(main: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop: its datagram path is what lets one core relay 100,000 RTP packets/s."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        return asyncio.run(main)
    return uvloop.run(main)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
