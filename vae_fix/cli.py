"""`python -m vae_fix <command>`: exit 0 on success, 2 with a one-paragraph message on bad input."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands
from .errors import InputError, VAEFixError

ORDER = ["demo", "inspect", "logvar_map", "check", "convert", "reach_map", "cell_reach", "stats", "edit", "preview", "compare", "repair", "encode", "decode", "train", "finetune"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default is exit code 2 too, but with usage spam
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _command_modules():
    found = {m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")}
    names = [n for n in ORDER if n in found] + sorted(found - set(ORDER))
    return [importlib.import_module(f"{commands.__name__}.{n}") for n in names]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m vae_fix", description="Inspect, measure and fix VAEs (KL-F8 family and relatives).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for mod in _command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def as_flag(err: Exception, args) -> Exception:
    """Engine errors name a parameter ("window"); on the command line it is the flag ("--window")."""
    if isinstance(err, InputError) and err.name.isidentifier() and hasattr(args, err.name):
        return InputError("--" + err.name.replace("_", "-"), err.problem, err.expected)
    return err


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (VAEFixError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"error: {as_flag(e, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
