"""``python -m captioning``: the entry point of every command.

The commands are grouped in the modules of this package (see ``registry.COMMANDS``); ``main``
loads only the group of the command it runs, and each command imports the library inside its
function, so ``--help`` and parsing import no torch. Library errors become one-line messages
and exit code 2 instead of tracebacks; ``CAPTIONING_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from captioning.cli.args import PROG
from captioning.cli.reference import cli_reference_markdown
from captioning.cli.registry import COMMANDS, build_parser
from captioning.core.settings import debug

__all__ = ["COMMANDS", "EXIT_USER_ERROR", "PROG", "build_parser", "cli_reference_markdown", "main"]

EXIT_USER_ERROR = 2
# what a user's mistake raises (DataError, ImageLoadError, BundleError, StaleCacheError and
# the other library errors derive from these)
USER_ERRORS = (FileNotFoundError, ValueError, KeyError, RuntimeError)


def command_in(argv: Sequence[str]) -> str | None:
    """The command word of ``argv``: its first argument that is neither an option nor the
    value of ``--threads``."""
    takes_value = False
    for arg in argv:
        if takes_value:
            takes_value = False
        elif not arg.startswith("-"):
            return arg
        elif len(arg) > 2 and "--threads".startswith(arg):  # --threads N, or a prefix of it
            takes_value = True
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    name = command_in(argv)
    args = build_parser([name] if name in COMMANDS else []).parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if debug():
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # e.g. `| head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
