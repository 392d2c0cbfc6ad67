"""``help-markdown``: the CLI reference table (docs/cli.md), generated from the parser."""

from __future__ import annotations

import argparse
from pathlib import Path

from captioning.cli.args import CommandParsers


def _subparsers_action(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _flag_usage(a: argparse.Action) -> str:
    if not a.option_strings:
        return a.metavar or a.dest
    name = max(a.option_strings, key=len)
    if a.nargs == 0:
        return name
    metavar = a.metavar or (
        "{" + ",".join(map(str, a.choices)) + "}" if a.choices else a.dest.upper()
    )
    return f"{name} {metavar}" + (" …" if a.nargs in ("+", "*") else "")


def _default(a: argparse.Action) -> str:
    if a.default in (None, False, [], "", argparse.SUPPRESS) or a.nargs == 0:
        return ""
    value = " ".join(map(str, a.default)) if isinstance(a.default, list) else a.default
    if isinstance(value, str) and "/" in value:  # an absolute path of this checkout
        value = Path(value).name
    return f" ({value})"


def cli_reference_markdown(parser: argparse.ArgumentParser) -> str:
    """One row per subcommand: what it does, its required arguments, its options (default)."""
    rows = ["| command | what it does | required | options (default) |", "|---|---|---|---|"]
    action = _subparsers_action(parser)
    helps = {a.dest: a.help for a in action._choices_actions}
    for name, sp in action.choices.items():
        acts = [a for a in sp._actions if not isinstance(a, argparse._HelpAction)]
        required = [a for a in acts if a.required or not a.option_strings]
        optional = [a for a in acts if a not in required]
        req = " ".join(f"`{_flag_usage(a)}`" for a in required) or "—"
        opt = ", ".join(f"`{_flag_usage(a)}`{_default(a)}" for a in optional) or "—"
        rows.append(f"| `{name}` | {helps[name]} | {req} | {opt} |")
    return "\n".join(rows)


def cmd_help_markdown(args: argparse.Namespace) -> int:
    from captioning.cli.registry import build_parser

    print(cli_reference_markdown(build_parser()))
    return 0


def add_parsers(commands: CommandParsers) -> None:
    commands.command("help-markdown", cmd_help_markdown)
