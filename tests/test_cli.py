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
