"""The ``hf-backdoor`` command line: the Python API's main paths, with defaults that run offline on packaged data.

    hf-backdoor poison   --dataset sst2 --attack badnet --output data/sst2-badnet
    hf-backdoor train    --dataset data/sst2-badnet --defense btu --output-dir runs/sst2-btu
    hf-backdoor scan     --dataset data/sst2-badnet --defense btu
    hf-backdoor evaluate --model runs/sst2-btu --dataset data/sst2-badnet --floor-model runs/sst2-clean
    hf-backdoor sanitize --model runs/sst2-undefended --dataset sst2 --defense rnp --output-dir runs/sst2-rnp
    hf-backdoor report   --run-dir runs/sst2-btu

One module per subcommand; each lists the dataclasses its flags are built from (``DATACLASSES``, turned into flags by
``transformers.HfArgumentParser``) and a ``run`` function taking them. Exit codes: 0 success, 1 the work failed (the
message says why and what to change), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from . import evaluate, poison, report, sanitize, scan, train
from .options import CommandError, HelpFormatter, dataclasses_from_namespace, prefer_dashes, set_choices

COMMANDS = {module.NAME: module for module in (poison, train, scan, evaluate, sanitize, report)}

__all__ = ["COMMANDS", "CommandError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-backdoor`` parser; ``parser.commands[name]`` is each subcommand's ``HfArgumentParser``."""
    from importlib import metadata

    from transformers import HfArgumentParser

    from ..attacks import ATTACKS

    try:
        version = metadata.version("hf-backdoor")
    except metadata.PackageNotFoundError:
        version = "unknown"
    parser = argparse.ArgumentParser(
        prog="hf-backdoor",
        description="Backdoor-safe fine-tuning for Hugging Face models: poison, train with defenses, scan, "
        "evaluate, sanitize and report.",
        epilog="Every subcommand has --help. Runs offline on the packaged data and model by default.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level and show tracebacks")
    parser.add_argument("--version", action="version", version=f"hf-backdoor {version}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=HfArgumentParser)
    parser.commands = {}
    for name, module in COMMANDS.items():
        epilog = getattr(module, "epilog", None)
        command = sub.add_parser(
            name,
            dataclass_types=module.DATACLASSES,
            help=module.HELP,
            description=module.DESCRIPTION,
            epilog=epilog() if epilog else None,
            formatter_class=HelpFormatter,
        )
        command.add_argument(
            "--import-module",
            "--import_module",
            dest="import_module",
            nargs="+",
            action="extend",
            default=[],
            metavar="MODULE",
            help="Python modules to import first: plugins that register their own defenses or attacks with "
            "`hf_backdoor.registry` (imported before the other options are read)",
        )
        set_choices(command, "attack", sorted(ATTACKS))
        prefer_dashes(command)
        parser.commands[name] = command
    return parser


def import_plugins(argv: list[str]) -> None:
    """Import the ``--import-module`` modules before the parser is built, so the defenses and attacks they register
    are in the help, the choices and the registry."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--import-module", "--import_module", dest="modules", nargs="+", action="extend", default=[])
    modules = pre.parse_known_args(argv)[0].modules
    if modules and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: a plugin next to the user's data is importable
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise CommandError(f"--import-module {name}: cannot import it ({error}).") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        import_plugins(argv)
    except (CommandError, ValueError) as error:  # a plugin that registers a taken name raises ValueError
        command = next((arg for arg in argv if arg in COMMANDS), "")
        print(f"hf-backdoor {command}: error: {error}".replace("  ", " "), file=sys.stderr)
        return 1
    parser = build_parser()
    namespace = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if namespace.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    module = COMMANDS[namespace.command]
    try:
        arguments = dataclasses_from_namespace(parser.commands[namespace.command].dataclass_types, namespace)
        return module.run(*arguments, argv=argv)
    except (CommandError, ValueError, TypeError, OSError) as error:
        print(f"hf-backdoor {namespace.command}: error: {error}", file=sys.stderr)
        if namespace.verbose:
            raise
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
