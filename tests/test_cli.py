"""CLI smoke tests: every subcommand has --help, classify is right, errors are one clean line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import skimage.data
from PIL import Image

from captioning.cli import build_parser, main

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "captioning", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )


def subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return list(action.choices)


def test_help_lists_subcommands():
    out = run("--help")
    assert out.returncode == 0
    for name in ("classify", "extract", "convert-weights", "encoders", "data"):
        assert name in out.stdout


@pytest.mark.parametrize("name", subcommands())
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_classify_prints_top5_best_first(tmp_path, capsys):
    path = tmp_path / "cat.png"
    Image.fromarray(skimage.data.chelsea()).save(path)
    assert main(["classify", "--precision", "fp32", "--json", str(path)]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    probs = [t["prob"] for t in rec["top"]]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True)
    assert rec["top"][0]["label"] == "Egyptian cat"


def test_classify_reports_broken_files_and_exit_code(tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    assert main(["classify", str(bad)]) == 1
    assert "bad.jpg" in capsys.readouterr().err


def test_missing_data_dir_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.delenv("CAPTIONING_DATA", raising=False)
    assert main(["data"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "CAPTIONING_DATA" in err and "Traceback" not in err


def test_encoders_lists_registry(capsys):
    assert main(["encoders"]) == 0
    out = capsys.readouterr().out
    assert "resnet50" in out and "vgg16" in out and "auto precision" in out


def test_data_summary_on_real_data(flickr8k_dir, capsys):
    assert main(["data", "--data", str(flickr8k_dir)]) == 0
    assert "train 6000, dev 1000, test 1000" in capsys.readouterr().out


def test_extract_cli_on_real_data(flickr8k_dir, tmp_path):
    args = ("extract", "--encoder", "resnet50", "--data", str(flickr8k_dir), "--cache",
            str(tmp_path), "--limit", "3", "--precision", "fp32")  # fmt: skip
    out = run(*args)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["new_images"] == 3 and summary["total_images"] == 3
    again = json.loads(run(*args).stdout.strip().splitlines()[-1])
    assert again["new_images"] == 0


# ---------------------------------------------------------------- one parser module, light start


def test_parsers_live_only_in_cli():
    """No library module builds an argparse parser or registers commands (issue 10, §6)."""
    lib = REPO / "captioning"
    for path in sorted(lib.glob("*.py")):
        if path.name in ("cli.py", "__main__.py"):
            continue
        text = path.read_text()
        for needle in ("import argparse", "register_cli", "add_parser(", "__import__("):
            assert needle not in text, f"{path.name} contains {needle!r}"


def test_import_and_parse_do_not_load_torch():
    code = (
        "import sys, captioning; from captioning.cli import build_parser; "
        "build_parser().parse_args(['evaluate', '--model', 'm', '--split', 'test', '--record']); "
        "print(sorted(m for m in ('torch', 'numpy', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_public_api_is_importable_from_the_package():
    import importlib.metadata

    import captioning
    from captioning import Captioner
    from captioning.inference.captioner import Captioner as Direct

    assert Captioner is Direct and callable(Captioner.load)
    assert captioning.__version__ == importlib.metadata.version("captioning")
    with pytest.raises(AttributeError):
        captioning.NoSuchThing  # noqa: B018


# ---------------------------------------------------------------- argument validation


@pytest.mark.parametrize("beam", ["0", "-1", "11", "100", "2.5", "x"])
@pytest.mark.parametrize(
    "argv",
    [
        ["caption", "--model", "m", "x.jpg", "--beam"],
        ["evaluate", "--model", "m", "--beam"],
        ["tune-decoding", "--model", "m", "--beams", "1"],
    ],
)
def test_beam_out_of_range_is_refused_everywhere(argv, beam, capsys):
    """Old code: --beam 0 meant greedy in caption and the bundle default in evaluate."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*argv, beam])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "beam size" in err and "Traceback" not in err
    if beam.lstrip("-").isdigit():
        assert "must be 1..10 (1 = greedy)" in err


def test_beam_range_comes_from_decoding():
    from captioning.cli import beam_arg
    from captioning.models.decoding import MAX_BEAM, DecodeConfig

    assert beam_arg("1") == 1 and beam_arg(str(MAX_BEAM)) == MAX_BEAM
    DecodeConfig(beam_size=MAX_BEAM)  # the CLI's largest beam is one the decoder accepts
    with pytest.raises(ValueError):
        DecodeConfig(beam_size=MAX_BEAM + 1)


def test_set_parses_each_value_by_its_field_type():
    from dataclasses import dataclass

    from captioning.cli import parse_overrides

    got = parse_overrides(["dropout=0.5", "hidden_dim=768", "alpha_c = 0"])
    assert got == {"dropout": 0.5, "hidden_dim": 768, "alpha_c": 0.0}
    assert type(got["hidden_dim"]) is int and type(got["dropout"]) is float

    @dataclass
    class WithFlag:
        use_bias: bool = True
        size: int = 1

    # old code: type(True)("False") is True
    assert parse_overrides(["use_bias=False"], WithFlag) == {"use_bias": False}
    assert parse_overrides(["use_bias=yes"], WithFlag) == {"use_bias": True}
    with pytest.raises(ValueError, match="expected true or false"):
        parse_overrides(["use_bias=maybe"], WithFlag)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("kind=merge", "not settable, --decoder fixes it"),
        ("vocab_size=100", "not settable, the training vocabulary fixes it"),
        ("feat_dim=512", "not settable, --encoder fixes it"),
        ("hiden_dim=768", "unknown decoder setting"),
        ("hidden_dim=0.5", "expected an integer"),
        ("dropout=abc", "expected a number"),
        ("dropout=nan", "expected a finite number"),
        ("dropout", "expected KEY=VALUE"),
    ],
)
def test_set_refuses_bad_items(item, message):
    from captioning.cli import parse_overrides

    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_overrides([item])


def test_set_error_is_one_line_before_any_training(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "m"), "--set", "kind=merge"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --set kind") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_train_scst_flags_are_checked_before_any_work(capsys):
    """--samples belongs to --objective scst, and scst needs --init: one clear line each."""
    from captioning.cli import main

    assert main(["train", "--samples", "3", "--out", "/nonexistent/x"]) == 2
    assert "--objective scst" in capsys.readouterr().err
    assert main(["train", "--objective", "scst", "--out", "/nonexistent/x"]) == 2
    assert "needs --init" in capsys.readouterr().err
