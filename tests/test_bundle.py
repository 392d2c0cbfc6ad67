"""Bundles and the Captioner API, plus CLI smoke tests, on the tiny world's real bundles."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import skimage.data
from PIL import Image

from captioning.bundle.catalog import list_bundles, resolve_bundle
from captioning.bundle.format import BundleError
from captioning.inference.captioner import Captioner
from captioning.runtime.encoders import shared_encoder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def world_env(tiny_world, monkeypatch):
    for key, value in (
        ("CAPTIONING_MODELS", tiny_world.models),
        ("CAPTIONING_DATA", tiny_world.data),
        ("CAPTIONING_CACHE", tiny_world.cache),
    ):
        monkeypatch.setenv(key, str(value))
    return tiny_world


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "captioning", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )


@pytest.mark.slow
def test_list_bundles(world_env):
    names = [b.name for b in list_bundles()]
    assert names == sorted(
        ["resnet50-attention", "resnet50-inject", "vgg16-attention", "vgg16-inject"]
    )
    info = next(b for b in list_bundles() if b.name == "vgg16-attention")
    assert info.encoder == "vgg16" and info.decoder == "attention"
    from captioning.bundle.reports import default_result

    assert default_result(info, "test").n_images == 8


@pytest.mark.slow
def test_captioner_result_fields(world_env):
    cap = Captioner.load("resnet50-attention", precision="fp32", runtime="torch")
    res = cap.caption(Image.fromarray(skimage.data.astronaut()), beam_size=3)
    assert res.text and res.tokens == res.text.split()
    assert res.nbest[0] == (res.text, pytest.approx(res.score))
    assert len(res.nbest) == 3 and res.score <= 0
    assert res.attention.shape == (len(res.tokens), 7, 7)
    assert set(res.timings) == {"encode_ms", "decode_ms"}
    again = cap.caption(Image.fromarray(skimage.data.astronaut()), beam_size=3)
    assert again.text == res.text


@pytest.mark.slow
def test_vgg_attention_grid_and_inject_has_none(world_env):
    vgg = Captioner.load("vgg16-attention", precision="fp32", runtime="torch")
    res = vgg.caption(Image.fromarray(skimage.data.coffee()), beam_size=2)
    assert res.attention.shape[1:] == (14, 14)
    inj = Captioner.load("vgg16-inject", precision="fp32", runtime="torch")
    assert inj.caption(Image.fromarray(skimage.data.coffee())).attention is None
    assert inj.encoder is vgg.encoder, "bundles share one encoder instance"


@pytest.mark.slow
def test_batch_equals_single(world_env):
    cap = Captioner.load("resnet50-inject", precision="fp32", runtime="torch")
    imgs = [Image.fromarray(getattr(skimage.data, n)()) for n in ("chelsea", "rocket")]
    batch = cap.caption_batch(imgs, beam_size=3)
    assert [r.text for r in batch] == [cap.caption(i, beam_size=3).text for i in imgs]


@pytest.mark.slow
def test_bad_bundles_are_refused(world_env, tmp_path):
    bad = tmp_path / "copy"
    shutil.copytree(world_env.models / "resnet50-inject", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["encoder_sha256"] = "0" * 64
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="must match"):
        Captioner.load(bad)
    (bad / "decoder.safetensors").unlink()
    with pytest.raises(BundleError, match="missing decoder.safetensors"):
        Captioner.load(bad)
    with pytest.raises(BundleError, match="available: resnet50-attention"):
        resolve_bundle("no-such-model")
    assert shared_encoder.cache_info().currsize >= 1


@pytest.mark.slow
def test_cli_caption_json_and_skips(world_env, tmp_path):
    good = tmp_path / "cat.png"
    Image.fromarray(skimage.data.chelsea()).save(good)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    out = cli("caption", "--model", "resnet50-attention", "--json", "--beam", "2", str(tmp_path))
    assert out.returncode == 1, out.stderr
    lines = [json.loads(x) for x in out.stdout.strip().splitlines()]
    assert [Path(x["image"]).name for x in lines] == ["cat.png"]
    assert lines[0]["caption"] and "broken.jpg" in out.stderr
    ok = cli("caption", "--model", "resnet50-attention", "--csv", str(good))
    assert ok.returncode == 0 and ok.stdout.splitlines()[0] == "image,caption,logprob,confidence"


@pytest.mark.slow
def test_cli_models_evaluate_bench(world_env, tmp_path):
    models = cli("models")
    assert models.returncode == 0 and "vgg16-attention" in models.stdout
    ev = cli(
        "evaluate",
        "--model",
        "vgg16-inject",
        "--split",
        "test",
        "--beam",
        "2",
        "--json",
        "--out",
        str(tmp_path),
    )
    assert ev.returncode == 0, ev.stderr
    rec = json.loads(ev.stdout.strip().splitlines()[-1])
    for key in (
        "bleu1",
        "bleu2",
        "bleu3",
        "bleu4",
        "cider",
        "meteor",
        "rougeL",
        "n_images",
        "beam",
        "split",
    ):
        assert key in rec
    assert rec["n_images"] == 8 and rec["beam"] == 2 and rec["split"] == "test"
    (pred,) = tmp_path.glob("predictions_test_beam2_*.csv")
    assert f"wrote {pred}" in ev.stdout
    csv_lines = pred.read_text().splitlines()
    assert csv_lines[0] == "image,caption,logprob,confidence,cider,bleu1,bleu2,bleu3,bleu4"
    assert len(csv_lines) == 9
    bench = cli(
        "bench",
        "--model",
        "resnet50-inject",
        "--runs",
        "2",
        "--json",
        "--settings",
        "torch",
        "auto",
    )
    assert bench.returncode == 0, bench.stderr
    res = json.loads(bench.stdout.strip().splitlines()[-1])
    assert set(res["beams"]) == {"1", "3", "5"} and res["throughput_img_s"] > 0
    assert res["beams"]["3"]["total_ms"]["p50"] >= res["beams"]["3"]["encode_ms"]["p50"]


@pytest.mark.slow
def test_cli_errors_are_one_line(world_env):
    out = cli("caption", "--model", "nope", "x.jpg")
    assert out.returncode == 2 and out.stderr.startswith("error: no model bundle")
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_tune_decoding_picks_on_dev_and_applies(world_env, tmp_path):
    from captioning.bundle.card import write_card
    from captioning.bundle.records import set_decode_defaults
    from captioning.data import load_flickr8k
    from captioning.inference.tune import tune_decoding

    bundle = tmp_path / "tuned"
    shutil.copytree(world_env.models / "resnet50-inject", bundle)
    cap = Captioner.load(bundle, precision="fp32", runtime="torch")
    ds = load_flickr8k(world_env.data)
    best, rows = tune_decoding(cap, ds, beams=(1, 2), alphas=(0.0, 1.0), metric="bleu4")
    assert [(r["beam"], r["length_alpha"]) for r in rows] == [(1, 0.0), (2, 0.0), (2, 1.0)]
    assert best["bleu4"] == max(r["bleu4"] for r in rows)
    best, rows = tune_decoding(cap, ds, beams=(2,), alphas=(0.0,), ngrams=(0, 3))
    assert [r["no_repeat_ngram"] for r in rows] == [0, 3]
    assert rows[1]["repeat_trigram"] == 0.0  # blocking trigrams leaves none repeated
    assert best["cider"] == max(r["cider"] for r in rows)  # CIDEr-D is the default metric
    with pytest.raises(ValueError, match="unknown metric"):
        tune_decoding(cap, ds, beams=(1,), metric="bleu")
    set_decode_defaults(bundle, beam_size=2, length_alpha=1.0, no_repeat_ngram=3)
    loaded = Captioner.load(bundle, precision="fp32", runtime="torch").defaults
    assert (loaded.beam_size, loaded.no_repeat_ngram) == (2, 3)
    write_card(bundle)
    assert "Default decoding: beam 2 α 1" in (bundle / "card.md").read_text()
    with pytest.raises(TypeError):
        set_decode_defaults(bundle, beam=3)


@pytest.mark.slow
def test_evaluation_matches_direct_captioning_in_any_split_order(world_env):
    """Features come from the cache in cache order; predictions must follow the split's order."""
    from captioning.data import load_flickr8k
    from captioning.inference.evaluate import evaluate

    cap = Captioner.load("resnet50-attention", precision="fp32", runtime="torch")
    ds = load_flickr8k(world_env.data)
    cache = world_env.cache / "fp32-order"
    first = evaluate(cap, ds, "test", 2, cache_root=cache, meteor=False)  # fills the cache
    ds.splits["test"] = ds.splits["test"][::-1]
    reverse = evaluate(cap, ds, "test", 2, cache_root=cache, meteor=False)  # other order
    assert [r["image"] for r in reverse.predictions] == ds.splits["test"]
    for row in first.predictions + reverse.predictions:
        direct = cap.caption(ds.image_path(row["image"]), beam_size=2)
        assert row["caption"] == direct.text, row["image"]


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.mark.slow
def test_plain_evaluate_leaves_the_bundle_alone(world_env, tmp_path, monkeypatch, capsys):
    """A plain `evaluate` writes under runs/eval and leaves the bundle's metrics.json and card.md
    as they were."""
    from captioning.cli import main

    bundle = tmp_path / "m"
    shutil.copytree(world_env.models / "vgg16-inject", bundle)
    before = _snapshot(bundle)
    monkeypatch.chdir(tmp_path)
    args = ["evaluate", "--model", str(bundle), "--split", "dev", "--precision", "fp32"]
    assert main([*args, "--no-meteor", "--limit", "4"]) == 0
    assert _snapshot(bundle) == before
    out_dir = tmp_path / "runs" / "eval" / "m"
    (pred,) = out_dir.glob("predictions_dev_first4_beam3_*.csv")
    doc = json.loads((out_dir / "metrics.json").read_text())
    (rec,) = doc["records"]
    assert rec["limit"] == 4 and rec["predictions"] == pred.name and rec["precision"] == "fp32"
    out = capsys.readouterr().out
    assert f"wrote {pred.relative_to(tmp_path)}" in out and "the bundle m is unchanged" in out


@pytest.mark.slow
def test_evaluate_record_adds_this_settings_row_and_says_so(world_env, tmp_path, capsys):
    from captioning.bundle.reports import default_result, results
    from captioning.cli import main

    bundle = tmp_path / "m"
    shutil.copytree(world_env.models / "resnet50-inject", bundle)
    (info,) = list_bundles(tmp_path)
    default_before = default_result(info, "test")
    n_before = len(info.records)
    args = ["evaluate", "--model", str(bundle), "--split", "test", "--precision", "fp32"]
    assert main([*args, "--no-meteor", "--record", "--length-alpha", "1.0"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {bundle / 'metrics.json'} (added a record for test beam 3 α 1 fp32" in out
    assert f"wrote {bundle / 'card.md'}" in out
    (info,) = list_bundles(tmp_path)
    assert len(info.records) == n_before + 1
    assert default_result(info, "test") == default_before  # the default row is untouched
    alpha1 = [r for r in results(info) if r.length_alpha == 1.0]
    assert len(alpha1) == 1 and alpha1[0].predictions.is_file() and not alpha1[0].default
    assert "beam 3 α 1 | fp32" in (bundle / "card.md").read_text()
    with pytest.raises(SystemExit):  # --record and --out exclude each other
        main([*args, "--record", "--out", str(tmp_path / "x")])
