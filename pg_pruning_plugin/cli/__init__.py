"""``pg-prune``: one sub-command per module in this package.

Each command module defines ``NAME`` and ``HELP`` (string literals), ``add_arguments(parser)`` and
``run(args) -> int``, and may define ``interrupted(args, argv) -> str``, the line printed when the user
presses Ctrl-C. Only the module of the command being run is imported: the others are listed with
``NAME`` and ``HELP`` read from their source, so ``pg-prune --help`` imports neither torch nor
transformers. Each sub-command's ``--help`` shows the defaults. Errors that are the user's to fix (bad paths, ratios,
unsupported models) end with a one-line message and exit code 2 instead of a traceback; Ctrl-C ends
with one line and exit code 130.

The commands of :data:`DISTRIBUTED_COMMANDS` also run under ``torchrun``: the process group is
initialised from torchrun's environment before the command runs and destroyed after it
(core/distributed.py; one rank on a GPU machine puts the run on its GPU), ranks other than 0 log
warnings only, each line prefixed with its rank, and a run that another rank ended (it died, raised
or timed out after ``--dist-timeout`` seconds) ends with one line and exit code 1. Other commands
refuse several ranks.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

COMMANDS = ("prune", "eval", "build_tasks", "recipe", "bench", "compare", "export_gguf")  # modules, in --help order

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
DISTRIBUTED_COMMANDS = ("prune", "compare")  # commands that run under torchrun, one process per rank


@functools.cache
def _headers() -> dict[str, tuple[str, str]]:
    """``{NAME: (module, HELP)}`` of every command module, read from the sources without importing them
    (their imports take seconds); a module whose ``NAME``/``HELP`` are not literals is imported."""
    headers = {}
    for module_name in COMMANDS:
        spec = importlib.util.find_spec(f"{__name__}.{module_name}")
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
        found = {node.targets[0].id: node.value for node in tree.body
                 if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                 and node.targets[0].id in ("NAME", "HELP")}
        try:
            name, summary = ast.literal_eval(found["NAME"]), ast.literal_eval(found["HELP"])
        except (KeyError, ValueError):
            module = importlib.import_module(f"{__name__}.{module_name}")
            name, summary = module.NAME, module.HELP
        headers[name] = (module_name, summary)
    return headers


def command_module(command: str) -> ModuleType:
    """The module that implements ``command`` (imported now)."""
    return importlib.import_module(f"{__name__}.{_headers()[command][0]}")


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``pg-prune`` parser with the full arguments of ``commands`` (default: all); the other commands
    are listed with their summary only, so their modules are not imported."""
    full = set(_headers() if commands is None else commands)
    parser = argparse.ArgumentParser(
        prog="pg-prune",
        description="Forward-only policy-gradient structural pruning of LLMs (Gao et al., ACL 2025).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, summary) in _headers().items():
        command = sub.add_parser(name, help=summary, description=summary,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name in full:
            command_module(name).add_arguments(command)
            if name in DISTRIBUTED_COMMANDS:
                command.add_argument("--dist-timeout", type=float, default=1800.0,
                                     help="under torchrun: seconds a rank waits for the others in any exchange "
                                          "before the run ends with an error")
    return parser


def _world_rank() -> tuple[int, int]:
    """``(WORLD_SIZE, RANK)`` of torchrun's environment, ``(1, 0)`` outside it."""
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


@contextlib.contextmanager
def _process_group(args: argparse.Namespace):
    """Under torchrun, the process group of a distributed command for the duration of the block (one rank
    included: it runs on its GPU); other commands run alone, and refuse several ranks."""
    world, _ = _world_rank()
    if "RANK" not in os.environ or (world <= 1 and args.command not in DISTRIBUTED_COMMANDS):
        yield
        return
    if args.command not in DISTRIBUTED_COMMANDS:
        raise ValueError(f"pg-prune {args.command} runs in one process; launch it without torchrun (torchrun runs: "
                         f"{', '.join(DISTRIBUTED_COMMANDS)})")
    from ..core import distributed

    distributed.init_from_environment(args.dist_timeout)
    try:
        yield
    finally:
        distributed.shutdown()


def _command_of(argv: list[str]) -> str | None:
    """The command named in ``argv`` (the first word that is not an option), if any."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in _headers() else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = module = None
    try:
        command = _command_of(argv)
        args = build_parser([command] if command else []).parse_args(argv)
        if args.command is None:
            build_parser([]).print_help()
            return 2
        world, rank = _world_rank()
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO if rank == 0 else logging.WARNING,
            format=("" if world <= 1 else f"[rank {rank}] ") + "%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
        module = command_module(args.command)
        with _process_group(args):
            return module.run(args)
    except KeyboardInterrupt:  # anywhere, imports included: one line, no traceback
        explain = getattr(module, "interrupted", None)
        prog = f"pg-prune {args.command}" if args is not None and args.command else "pg-prune"
        print(f"{prog}: {explain(args, argv) if explain else 'interrupted'}", file=sys.stderr)
        return 130
    except Exception as exc:
        from ..resources.text import TextSourceUnavailable

        ranks = sys.modules.get(f"{__name__.rpartition('.')[0]}.core.distributed")  # imported by a distributed run
        if args is not None and not args.verbose and ranks is not None and isinstance(exc, ranks.DistributedError):
            print(f"pg-prune {args.command}: error: {exc}", file=sys.stderr)  # another rank ended the run
            return 1
        if args is None or args.verbose or not isinstance(exc, (*USER_ERRORS, TextSourceUnavailable)):
            raise
        print(f"pg-prune {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
