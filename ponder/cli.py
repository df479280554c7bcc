"""`ponder <subcommand>`: dispatches to the package that owns each subcommand."""

from __future__ import annotations

import argparse
import sys

from ponder import __version__


def build_parser() -> argparse.ArgumentParser:
    from benchmarks import cli as benchmarks_cli
    from exporters import cli as exporters_cli
    from loadtests import cli as loadtest_cli
    from runtime import cli as runtime_cli
    from server import cli as server_cli
    from training import cli as training_cli

    parser = argparse.ArgumentParser(prog="ponder", description="Serve and train adaptive-compute language models.")
    parser.add_argument("--version", action="version", version=f"ponder {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    runtime_cli.add_parsers(sub)
    server_cli.add_parsers(sub)
    training_cli.add_parsers(sub)
    exporters_cli.add_parsers(sub)
    benchmarks_cli.add_parsers(sub)
    loadtest_cli.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from runtime.checkpoint import CheckpointError
    from runtime.engine.core_client import EngineDeadError
    from runtime.engine.scheduler import OverloadedError

    try:
        args.func(args)
    except (ValueError, OSError, CheckpointError, OverloadedError, EngineDeadError) as e:  # OSError: missing files, unreachable hub ids
        print(f"ponder {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
