"""The CLI: its command registry, light start, argument checks, one-line errors, and commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import skimage.data
from PIL import Image

from captioning.cli import COMMANDS, EXIT_USER_ERROR, build_parser, main
from captioning.cli.args import beam_arg, parse_overrides
from captioning.cli.registry import Command

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "captioning", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )


def subparsers(parser) -> dict:
    action = next(a for a in parser._actions if a.dest == "command")
    return dict(action.choices)


# ---------------------------------------------------------------- registry and light start


def test_the_registry_lists_exactly_the_commands_of_the_parser():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    assert list(action.choices) == list(COMMANDS)  # the order of --help too
    helps = {a.dest: a.help for a in action._choices_actions}
    for name, sub in action.choices.items():
        run_ = sub.get_default("func")
        assert run_.__module__ == f"captioning.cli.{COMMANDS[name].module}", name
        assert helps[name] == COMMANDS[name].help
    assert all(isinstance(c, Command) for c in COMMANDS.values())


def test_only_the_asked_commands_get_their_arguments():
    parser = build_parser(["train"])
    subs = subparsers(parser)
    assert list(subs) == list(COMMANDS)  # --help still lists every command
    assert subs["train"].get_default("func") is not None
    assert subs["classify"].get_default("func") is None
    assert all(p.get_default("func") is None for p in subparsers(build_parser([])).values())


def test_top_level_help_lists_every_command_in_order_and_imports_no_torch():
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "captioning", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    listed = [line.split()[0] for line in out.stdout.splitlines() if line.startswith("    ")]
    assert [w for w in listed if w in COMMANDS] == list(COMMANDS)
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()}
    assert "torch" not in imported and "captioning.cli" in imported


HELP_OF_EVERY_COMMAND = """
import contextlib, io, sys
from captioning.cli import COMMANDS, main
for argv in [["--help"]] + [[name, "--help"] for name in COMMANDS]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit as e:
            assert e.code == 0, (argv, e.code)
    assert out.getvalue().startswith("usage: python -m captioning"), argv
    heavy = [m for m in ("torch", "numpy") if m in sys.modules]
    assert not heavy, f"{' '.join(argv)} imported {heavy}"
print(len(COMMANDS))
"""


def test_help_of_every_command_imports_no_torch():
    out = subprocess.run(
        [sys.executable, "-c", HELP_OF_EVERY_COMMAND],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(len(COMMANDS))


def test_import_and_parse_do_not_load_torch():
    code = (
        "import sys, captioning; from captioning.cli import build_parser; "
        "build_parser().parse_args(['evaluate', '--model', 'm', '--split', 'test', '--record']); "
        "build_parser().parse_args(['train', '--out', 'o', '--encoder', 'vgg16', '--finetune', "
        "'block5', '--runtime', 'torch', '--decoder', 'merge']); "
        "print(sorted(m for m in ('torch', 'numpy', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_choices_are_the_names_the_library_registers():
    from captioning.cli import args
    from captioning.inference.calibrate import CANDIDATES
    from captioning.inference.tune import TUNE_METRICS
    from captioning.models.blocks import FINETUNE_BLOCKS
    from captioning.models.decoders import DECODER_KINDS
    from captioning.models.encoders import ENCODERS
    from captioning.runtime.openvino import RUNTIMES
    from captioning.training.scst import BASELINES

    library = (
        ENCODERS,
        DECODER_KINDS,
        RUNTIMES,
        FINETUNE_BLOCKS,
        TUNE_METRICS,
        BASELINES,
        CANDIDATES,
    )
    offered = (
        args.ENCODER_CHOICES,
        args.DECODER_CHOICES,
        args.RUNTIME_CHOICES,
        args.FINETUNE_CHOICES,
        args.TUNE_METRIC_CHOICES,
        args.BASELINE_CHOICES,
        args.CALIBRATE_CHOICES,
    )
    assert [tuple(names) for names in library] == list(offered)


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["train", "--out", "x"], "train"),
        (["--threads", "2", "data", "-v"], "data"),
        (["--threads=2", "data"], "data"),
        (["--thr", "2", "evaluate"], "evaluate"),
        (["-h", "caption"], "caption"),
        (["--help"], None),
        ([], None),
        (["no-such-command"], "no-such-command"),
    ],
)
def test_the_command_word_is_found_before_parsing(argv, command):
    from captioning.cli import command_in

    assert command_in(argv) == command


# ---------------------------------------------------------------- argument checks


PARSE_ERRORS = [
    ([], "the following arguments are required: COMMAND"),
    (["no-such-command"], "invalid choice: 'no-such-command'"),
    (["--threads", "0", "encoders"], "must be at least 1, got 0"),
    (["caption", "x.jpg", "--model", "m", "--beam", "0"], "beam size must be 1..10 (1 = greedy)"),
    (
        ["caption", "x.jpg", "--model", "m", "--beam", "11"],
        "beam size must be 1..10 (1 = greedy), got 11",
    ),
    (["caption", "x.jpg", "--model", "m", "--beam", "2.5"], "beam size must be a whole number"),
    (["evaluate", "--model", "m", "--beam", "-1"], "beam size must be 1..10 (1 = greedy), got -1"),
    (["evaluate", "--model", "m", "--beam", "x"], "beam size must be a whole number, got 'x'"),
    (["tune-decoding", "--model", "m", "--beams", "1", "100"], "beam size must be 1..10"),
    (["bench", "--model", "m", "--folder-beam", "0"], "beam size must be 1..10"),
    (["classify", "x.jpg", "--top", "0"], "must be at least 1, got 0"),
    (["extract", "--encoder", "resnet50", "--limit", "-1"], "must be at least 1, got -1"),
    (["evaluate", "--model", "m", "--length-alpha", "inf"], "must be a finite number >= 0"),
    (["evaluate", "--model", "m", "--length-alpha", "abc"], "must be a number, got 'abc'"),
    (["train", "--out", "o", "--label-smoothing", "1"], "must be below 1, got 1"),
    (["extract", "--encoder", "vit"], "invalid choice: 'vit'"),
    (["extract"], "the following arguments are required: --encoder"),
    (["train", "--out", "o", "--decoder", "gru"], "invalid choice: 'gru'"),
    (["train", "--out", "o", "--finetune", "layer3"], "invalid choice: 'layer3'"),
    (["train", "--out", "o", "--baseline", "max"], "invalid choice: 'max'"),
    (["train", "--out", "o", "--resume", "--force"], "not allowed with argument --resume"),
    (["train"], "the following arguments are required: --out"),
    (["evaluate", "--model", "m", "--runtime", "tensorrt"], "invalid choice: 'tensorrt'"),
    (["evaluate", "--model", "m", "--precision", "fp8"], "invalid choice: 'fp8'"),
    (["evaluate", "--model", "m", "--device", "tpu"], "invalid choice: 'tpu'"),
    (["evaluate", "--model", "m", "--out", "o", "--record"], "not allowed with argument --out"),
    (["evaluate"], "the following arguments are required: --model"),
    (["caption", "x.jpg", "--model", "m", "--json", "--csv"], "not allowed with argument --json"),
    (["soup", "a", "b", "--out", "o", "--metric", "meteor"], "invalid choice: 'meteor'"),
    (["soup", "a", "b"], "the following arguments are required: --out"),
    (["ensemble"], "the following arguments are required: MODEL"),
    (["serve", "--model", "m", "--port", "0"], "must be at least 1, got 0"),
]


@pytest.mark.parametrize(
    ("argv", "message"), PARSE_ERRORS, ids=[" ".join(a) or "no command" for a, _ in PARSE_ERRORS]
)
def test_bad_arguments_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.startswith("usage: python -m captioning")


PARSED = [
    (["--threads", "2", "encoders"], "threads", 2),
    (["encoders"], "threads", None),
    (["caption", "x.jpg", "--model", "m", "--beam", "1"], "beam", 1),
    (["caption", "x.jpg", "--model", "m"], "procs", None),
    (["caption", "x.jpg", "--model", "m"], "batch_size", 16),
    (["evaluate", "--model", "m"], "beam", None),
    (["evaluate", "--model", "m"], "split", "dev"),
    (["evaluate", "--model", "m"], "meteor", True),
    (["evaluate", "--model", "m", "--no-meteor"], "meteor", False),
    (["evaluate", "--model", "m", "--length-alpha", "0.5"], "length_alpha", 0.5),
    (["evaluate", "--model", "m", "--no-repeat-ngram", "3"], "no_repeat_ngram", 3),
    (["tune-decoding", "--model", "m"], "beams", [1, 3, 5]),
    (["tune-decoding", "--model", "m"], "alphas", [0.0, 0.5, 1.0]),
    (["tune-decoding", "--model", "m"], "no_repeat_ngrams", [0, 3]),
    (["tune-decoding", "--model", "m"], "metric", "cider"),
    (["train", "--out", "o"], "encoder", "resnet50"),
    (["train", "--out", "o"], "decoder", "attention"),
    (["train", "--out", "o"], "objective", "xe"),
    (["train", "--out", "o"], "runtime", None),
    (["train", "--out", "o", "--set", "a=1", "--set", "b=2"], "set", ["a=1", "b=2"]),
    (["train", "--out", "o", "--label-smoothing", "0.1"], "label_smoothing", 0.1),
    (["extract", "--encoder", "vgg16"], "runtime", "auto"),
    (["soup", "a", "b", "--out", "o"], "members", ["a", "b"]),
    (["soup", "a", "b", "--out", "o"], "greedy", False),
    (["models"], "split", "test"),
    (["serve", "--model", "m"], "host", "127.0.0.1"),
    (["bench-serve"], "model", None),  # resolved to the best single model on dev
    (["bench-serve"], "clients", [1, 8, 32]),
]


@pytest.mark.parametrize(
    ("argv", "dest", "value"), PARSED, ids=[f"{' '.join(a)}: {d}" for a, d, _ in PARSED]
)
def test_arguments_and_defaults(argv, dest, value):
    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value


def test_beam_range_comes_from_decoding():
    from captioning.models.decoding import MAX_BEAM, DecodeConfig

    assert beam_arg("1") == 1 and beam_arg(str(MAX_BEAM)) == MAX_BEAM
    DecodeConfig(beam_size=MAX_BEAM)  # the CLI's largest beam is one the decoder accepts
    with pytest.raises(ValueError):
        DecodeConfig(beam_size=MAX_BEAM + 1)


def test_set_parses_each_value_by_its_field_type():
    from dataclasses import dataclass

    got = parse_overrides(["dropout=0.5", "hidden_dim=768", "alpha_c = 0"])
    assert got == {"dropout": 0.5, "hidden_dim": 768, "alpha_c": 0.0}
    assert type(got["hidden_dim"]) is int and type(got["dropout"]) is float

    @dataclass
    class WithFlag:
        use_bias: bool = True
        size: int = 1

    assert parse_overrides(["use_bias=False"], WithFlag) == {"use_bias": False}  # not bool("False")
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
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_overrides([item])


# ---------------------------------------------------------------- errors and the entry point


def test_set_error_is_one_line_before_any_training(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "m"), "--set", "kind=merge"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --set kind") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_train_scst_flags_are_checked_before_any_work(capsys):
    """--samples belongs to --objective scst, and scst needs --init: one clear line each."""
    assert main(["train", "--samples", "3", "--out", "/nonexistent/x"]) == 2
    assert "--objective scst" in capsys.readouterr().err
    assert main(["train", "--objective", "scst", "--out", "/nonexistent/x"]) == 2
    assert "needs --init" in capsys.readouterr().err
    assert main(["train", "--finetune-lr", "1e-4", "--out", "/nonexistent/x"]) == 2
    assert "add --finetune" in capsys.readouterr().err


def test_missing_data_dir_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.delenv("CAPTIONING_DATA", raising=False)
    assert main(["data"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "CAPTIONING_DATA" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_captioning_debug_shows_the_traceback(monkeypatch):
    from captioning.data import DataError

    monkeypatch.delenv("CAPTIONING_DATA", raising=False)
    monkeypatch.setenv("CAPTIONING_DEBUG", "1")
    with pytest.raises(DataError, match="CAPTIONING_DATA"):
        main(["data"])


def test_threads_are_set_before_the_command(monkeypatch, capsys):
    import torch

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.delenv("CAPTIONING_DATA", raising=False)
    assert main(["--threads", "3", "data"]) == 2
    assert calls == [3]


def test_help_markdown_is_one_row_per_command(capsys):
    assert main(["help-markdown"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].startswith("| command | what it does |")
    assert [r.split(" | ")[0].strip("| `") for r in rows[2:]] == list(COMMANDS)


def test_public_api_is_importable_from_the_package():
    import importlib.metadata

    import captioning
    from captioning import Captioner
    from captioning.inference.captioner import Captioner as Direct

    assert Captioner is Direct and callable(Captioner.load)
    assert captioning.__version__ == importlib.metadata.version("captioning")
    with pytest.raises(AttributeError):
        captioning.NoSuchThing  # noqa: B018


# ---------------------------------------------------------------- commands


@pytest.mark.slow
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


def test_encoders_lists_registry(capsys):
    assert main(["encoders"]) == 0
    out = capsys.readouterr().out
    assert "resnet50" in out and "vgg16" in out and "auto precision" in out


def test_models_on_an_empty_folder_says_how_to_train(tmp_path, capsys):
    assert main(["models", "--models-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"no bundles in {tmp_path}") and "python -m captioning train" in out


def test_soup_scoring_flags_need_greedy(tmp_path, capsys):
    out = tmp_path / "soup"
    assert main(["soup", "a", "b", "--out", str(out), "--beam", "2", "--limit", "5"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "error: --beam, --limit: only with --greedy (they set how candidates are scored)"
    )
    assert not out.exists()


def test_data_summary_on_real_data(flickr8k_dir, capsys):
    assert main(["data", "--data", str(flickr8k_dir)]) == 0
    assert "train 6000, dev 1000, test 1000" in capsys.readouterr().out


@pytest.mark.slow
def test_extract_cli_on_real_data(flickr8k_dir, tmp_path):
    args = ["extract", "--encoder", "resnet50", "--data", str(flickr8k_dir)]
    args += ["--cache", str(tmp_path), "--limit", "3", "--precision", "fp32"]
    out = run(*args)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["new_images"] == 3 and summary["total_images"] == 3
    again = json.loads(run(*args).stdout.strip().splitlines()[-1])
    assert again["new_images"] == 0


# ---------------------------------------------------------------- greedy-soup dev scoring


def test_soup_scorer_names_what_it_measures(tmp_path):
    from captioning.data import load_dataset
    from captioning.inference.soup_score import dev_scorer
    from captioning.models.decoding import DecodeConfig
    from tests.synthetic import make_tiny_flickr

    ds = load_dataset(make_tiny_flickr(tmp_path, sizes={"train": 1, "dev": 1, "test": 1}))
    part = dev_scorer(ds, DecodeConfig(beam_size=3, length_alpha=0.5), "cider", limit=5)
    assert part.label == "first 5 dev images CIDEr-D, beam 3 α 0.5"
    full = dev_scorer(ds, DecodeConfig(beam_size=2, no_repeat_ngram=3), "bleu4")
    assert full.label == "dev BLEU-4, beam 2 α 0 no_repeat_ngram=3"
    full.discard(tmp_path / "never-scored")  # nothing cached for it: nothing to drop
    with pytest.raises(ValueError, match="unknown metric 'cidr'"):
        dev_scorer(ds, DecodeConfig(), "cidr")


@pytest.mark.slow
def test_soup_scorer_scores_like_evaluate_and_drops_the_features(tmp_path):
    from captioning.data import load_dataset
    from captioning.inference.captioner import Captioner
    from captioning.inference.evaluate import evaluate
    from captioning.inference.soup_score import dev_scorer, member_decoding
    from captioning.runtime.features import FeatureCache
    from captioning.training.train import TrainConfig
    from captioning.training.train import main as train_main
    from tests.synthetic import make_tiny_flickr

    data = make_tiny_flickr(tmp_path / "flickr", sizes={"train": 8, "dev": 3, "test": 1})
    small = {"embed_dim": 16, "hidden_dim": 32, "attn_dim": 16, "dropout": 0.0}
    cfg = TrainConfig(
        decoder="merge", epochs=1, batch_images=8, min_freq=1, precision="fp32", decoder_cfg=small
    )
    bundle, train_cache, cache = tmp_path / "m", tmp_path / "train-cache", tmp_path / "cache"
    train_main(cfg, str(data), bundle, train_cache, resume=False)
    ds = load_dataset(data)

    decoding = member_decoding(bundle, 2, no_repeat_ngram=2)
    assert (decoding.beam_size, decoding.no_repeat_ngram) == (2, 2)
    lines: list[str] = []
    scorer = dev_scorer(
        ds, decoding, "bleu1", precision="fp32", limit=2, cache_root=cache, report=lines.append
    )
    value = scorer.score(bundle)
    assert lines == [f"m: dev bleu1 {value}"]
    cap = Captioner.load(bundle, "fp32", runtime="torch")
    features = FeatureCache.for_encoder(cap.encoder, cache).directory
    assert features.is_dir()
    scorer.discard(bundle)
    assert not features.exists()
    fixed = {"length_alpha": decoding.length_alpha, "no_repeat_ngram": 2}
    ev = evaluate(cap, ds, "dev", 2, limit=2, cache_root=cache, meteor=False, **fixed)
    assert value == round(ev.metrics["bleu1"], 4)
