"""Every ``python -m captioning …`` command the README, docs/ or the dashboard shows parses with
the real parser, and the CLI reference lists every command, flag and default."""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from captioning.cli import build_parser, cli_reference_markdown

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
COMMAND = re.compile(r"(?:\bpython|\btorchrun[^\n`]*?) -m captioning\b(?P<rest>[^\n`]*)")
PLACEHOLDER = "1"  # for shell variables ($b) and f-string fields ({name}) in shown commands


def _python_strings(path: Path) -> list[str]:
    """The string literals of a Python file; f-string fields become ``PLACEHOLDER``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.JoinedStr):
            out.append(
                "".join(
                    v.value if isinstance(v, ast.Constant) else PLACEHOLDER for v in node.values
                )
            )
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append(node.value)
    return out


def _commands(text: str) -> list[str]:
    """Argument strings of the commands in ``text`` (shell continuations joined, comments cut)."""
    text = re.sub(r"\s*\\\n\s*", " ", text)
    found = []
    for m in COMMAND.finditer(text):
        rest = m["rest"]
        rest = re.split(r"\s#|;|\||&&|\s-->|\s>", rest)[0].strip()  # --> ends a marker
        if not rest or "…" in rest or "..." in rest:  # prose: "python -m captioning …"
            continue
        found.append(re.sub(r"\$\w+", PLACEHOLDER, rest))
    return found


def _shown_commands() -> list[tuple[str, str]]:
    shown = [(str(p.relative_to(REPO)), c) for p in PAGES for c in _commands(p.read_text())]
    for path in sorted((REPO / "dashboard").rglob("*.py")):
        for s in _python_strings(path):
            shown += [(str(path.relative_to(REPO)), c) for c in _commands(s)]
    return shown


SHOWN = _shown_commands()


def test_commands_are_found_in_readme_docs_and_dashboard():
    where = {w for w, _ in SHOWN}
    assert sum(w == "README.md" for w, _ in SHOWN) >= 10
    assert {"docs/training.md", "docs/scaling.md", "docs/performance.md"} <= where
    assert {"dashboard/components.py", "dashboard/app_pages/compare.py"} <= where
    hints = [c for w, c in SHOWN if w.startswith("dashboard/") and c.startswith("evaluate")]
    assert hints
    for c in hints:  # the pages show records at each bundle's default decoding
        assert "--record" in c and "--beam" not in c, c


@pytest.mark.parametrize(("where", "args"), SHOWN, ids=[f"{w}: {a}" for w, a in SHOWN])
def test_shown_command_parses(where, args):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(shlex.split(args))
        except SystemExit as e:
            assert e.code == 0, f"{where}: `python -m captioning {args}`: {err.getvalue()}"


def test_the_extractor_would_catch_a_bad_command():
    (bad,) = _commands("see `python -m captioning evaluate --model M --no-record` here")
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        build_parser().parse_args(shlex.split(bad))
    assert _commands("x\n.venv/bin/python -m captioning train --out d \\\n  --epochs 2 # c") == [
        "train --out d --epochs 2"
    ]
    assert _commands("for b in 1 3; do python -m captioning caption --beam $b x; done") == [
        "caption --beam 1 x"
    ]
    torchrun = "torchrun --nnodes 2 \\\n  -m captioning train --out d"
    assert _commands(torchrun) == ["train --out d"]


def test_cli_reference_lists_every_command_flag_and_default():
    ref = cli_reference_markdown(build_parser())
    rows = {r.split(" | ")[0].strip("| `"): r for r in ref.splitlines()[2:]}
    assert {"tune-decoding", "evaluate", "train", "caption", "help-markdown"} <= set(rows)
    ev = rows["evaluate"].split(" | ")
    assert ev[2] == "`--model MODEL`"  # required
    assert "`--split {dev,test}` (dev)" in ev[3] and "`--record`" in ev[3]  # defaulted: optional
    assert "`--out OUT`" in ev[3] and "`--length-alpha LENGTH_ALPHA`" in ev[3]
    assert "`--out OUT`" in rows["train"].split(" | ")[2]
