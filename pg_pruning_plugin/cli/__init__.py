"""``pg-prune``: one sub-command per module in this package.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``;
none imports Torch-Pruning or llmcompressor before its command runs.
Errors that are the user's to fix (bad paths, ratios, unsupported models) end with a one-line
message and exit code 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = ("prune", "eval", "build_tasks", "recipe", "bench", "compare", "export_gguf")

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pg-prune",
        description="Forward-only policy-gradient structural pruning of LLMs (Gao et al., ACL 2025).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS:
        module = importlib.import_module(f"{__name__}.{module_name}")
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    from ..resources.text import TextSourceUnavailable

    try:
        return args.handler(args)
    except (*USER_ERRORS, TextSourceUnavailable) as exc:
        if args.verbose:
            raise
        print(f"pg-prune {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
