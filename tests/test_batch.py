"""Batch captioning on Ray Data: inputs, pool sizing, the bundle digest, decoding tasks, error
rows, resume without duplicates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from captioning.bundle.format import BLOCK_FILE, DECODER_FILE
from captioning.serving.batch_files import (
    PARTIAL_PREFIX,
    ROW_FIELDS,
    check_compatible,
    existing_rows,
    read_inputs,
    row_schema,
    steady_rate,
)
from captioning.serving.ray_batch import (
    BatchConfig,
    load_files,
    loaded_schema,
    plan_pool,
    run_batch,
)
from captioning.serving.ray_bundle import bundle_sha256

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "artifacts" / "samples"
BUNDLE = REPO / "artifacts" / "models" / "resnet50-attention"


def test_plan_pool_leaves_cpus_for_read_tasks():
    two = plan_pool(2, workers=2)  # measured: 2 actors x 1 CPU stall against the read tasks
    assert (two.actors, two.cpus_per_actor, two.threads_per_actor) == (2, 0.5, 1)
    assert plan_pool(2) == two  # the default: one single-thread actor per CPU
    one = plan_pool(2, workers=1)
    assert (one.actors, one.cpus_per_actor, one.threads_per_actor) == (1, 1.0, 2)
    big = plan_pool(16)
    assert big.actors == 16 and big.actors * big.cpus_per_actor < 16
    assert plan_pool(4, workers=3).threads_per_actor == 1
    # memory caps the default pool (an actor holds its own model), never an explicit --workers
    assert plan_pool(16, cluster_memory=6 * 2**30).actors == 4
    assert plan_pool(16, cluster_memory=2**29).actors == 1
    assert plan_pool(16, workers=8, cluster_memory=2**29).actors == 8


def test_read_inputs_folder_list_csv_parquet(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for rel in ("a/x.jpg", "a/b/y.PNG", "a/notes.txt"):
        (tmp_path / rel).write_bytes(b"x")
    found = read_inputs(tmp_path / "a")
    assert found == [str(tmp_path / "a/b/y.PNG"), str(tmp_path / "a/x.jpg")]

    listing = tmp_path / "list.txt"
    listing.write_text(f"# photos\n{tmp_path}/a/x.jpg\n\n{tmp_path}/a/x.jpg\n/nowhere/z.jpg\n")
    assert read_inputs(listing) == [str(tmp_path / "a/x.jpg"), "/nowhere/z.jpg"]

    csv = tmp_path / "in.csv"
    csv.write_text(f"id,path\n1,{tmp_path}/a/x.jpg\n2,/nowhere/z.jpg\n")
    assert read_inputs(csv) == [str(tmp_path / "a/x.jpg"), "/nowhere/z.jpg"]

    parquet = tmp_path / "in.parquet"
    pq.write_table(pa.table({"path": ["/p/1.jpg", "/p/2.jpg"]}), parquet)
    assert read_inputs(parquet) == ["/p/1.jpg", "/p/2.jpg"]

    pq.write_table(pa.table({"file": ["/p/1.jpg"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="'path' column"):
        read_inputs(tmp_path / "bad.parquet")
    with pytest.raises(FileNotFoundError):
        read_inputs(tmp_path / "missing")


def test_existing_rows_sets_half_written_shards_aside(tmp_path):
    good = {k: ["/p/1.jpg"] for k in ROW_FIELDS}
    good["logprob"] = [-1.0]
    pq.write_table(pa.table(good), tmp_path / "run1_000000-0.parquet")
    (tmp_path / "run2_000000-0.parquet").write_bytes(b"PAR1 truncated")
    rows, aside = existing_rows(tmp_path)
    assert [r["path"] for r in rows] == ["/p/1.jpg"]
    assert aside == [str(tmp_path / f"{PARTIAL_PREFIX}run2_000000-0.parquet")]
    assert not (tmp_path / "run2_000000-0.parquet").exists()


def test_an_out_folder_refuses_another_bundle_or_decoding(tmp_path):
    rows = [{"path": "/p/1.jpg", "model": "m", "bundle_sha256": "a" * 64, "decoding": "{}"}]
    check_compatible(rows, "m", "a" * 64, "{}", tmp_path)
    check_compatible([], "m", "b" * 64, "{}", tmp_path)  # an empty folder takes any run
    for sha, decoding in (("b" * 64, "{}"), ("a" * 64, '{"beam_size": 2}')):
        with pytest.raises(ValueError, match="use another --out"):
            check_compatible(rows, "m", sha, decoding, tmp_path)


def test_bundle_sha256_covers_the_weights_and_the_tuned_block(tmp_path):
    files = {"config.json": b"{}", DECODER_FILE: b"decoder", "vocab.json": b"[]"}
    files |= {BLOCK_FILE: b"block", "history.json": b"[]"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    digest = bundle_sha256(tmp_path)
    assert len(digest) == 64 and bundle_sha256(tmp_path) == digest

    (tmp_path / BLOCK_FILE).write_bytes(b"another fine-tuned block")
    tuned = bundle_sha256(tmp_path)
    assert tuned != digest  # a changed block changes the captions, so the digest
    (tmp_path / "history.json").write_bytes(b"[1]")
    assert bundle_sha256(tmp_path) == tuned  # the training log decides no caption
    (tmp_path / DECODER_FILE).write_bytes(b"another decoder")
    assert bundle_sha256(tmp_path) != tuned
    frozen = bundle_sha256(tmp_path)
    (tmp_path / BLOCK_FILE).unlink()
    assert bundle_sha256(tmp_path) != frozen


def test_load_files_decodes_images_and_names_bad_ones(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    paths = [str(SAMPLES / "chelsea.jpg"), str(broken), str(tmp_path / "missing.jpg")]
    table = load_files(pa.table({"path": paths}))
    assert table.schema == loaded_schema()
    rows = table.to_pylist()
    assert [r["path"] for r in rows] == paths
    good = rows[0]
    assert good["error"] is None and min(good["height"], good["width"]) >= 224
    assert len(good["rgb"]) == good["height"] * good["width"] * 3  # uint8 [H, W, 3]
    assert "broken.jpg" in rows[1]["error"] and rows[1]["rgb"] == b""
    assert "missing.jpg" in rows[2]["error"]
    assert row_schema().names == list(ROW_FIELDS)


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray on 2 CPUs in a temp dir of its own; its reaper stops what ``ray.shutdown``
    leaves running."""
    ray = pytest.importorskip("ray")
    from captioning.serving.ray_cluster import LocalRay

    with LocalRay() as local:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=local.dir)
        yield ray
        ray.shutdown()


def _rows(out: Path) -> list[dict]:
    return pq.read_table(out).to_pylist()  # pyarrow skips the _partial-* files


def test_steady_rate_leaves_out_the_first_shard():
    # shards finished at t = 10 s (start-up included), 12 s and 14 s with 128, 128, 64 rows
    assert steady_rate([(14.0, 64), (10.0, 128), (12.0, 128)]) == pytest.approx(48.0)
    assert steady_rate([(10.0, 128)]) is None
    assert steady_rate([(10.0, 1), (10.0, 1)]) is None
    # two actors: both first shards (start-up) drop out, the clock starts at the later one
    two = [(10.0, 128), (10.1, 128), (12.0, 128), (14.1, 128)]
    assert steady_rate(two, actors=2) == pytest.approx(256 / 4.0)
    assert steady_rate(two[:2], actors=2) is None  # not 2560 images/s from a 0.1 s span


@pytest.mark.slow
@pytest.mark.skipif(not BUNDLE.is_dir(), reason="shipped bundle resnet50-attention is absent")
def test_batch_captions_errors_and_resume(ray_session, tmp_path):
    from captioning import Captioner

    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for name in ("chelsea.jpg", "coffee.jpg"):
        shutil.copy(SAMPLES / name, photos / name)
    (photos / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (photos / "sub" / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    torch_rt = {"beam": 2, "runtime": "torch"}  # the reference runtime; nothing cached outside
    cfg = BatchConfig(str(BUNDLE), str(photos), str(out), workers=2, progress=False, **torch_rt)

    report = run_batch(cfg)  # 2 actors on 2 CPUs: must not stall
    assert (report.inputs, report.captioned, report.errors) == (4, 2, 2)
    assert report.plan["cpus_per_actor"] == 0.5
    rows = {r["path"]: r for r in _rows(out)}
    assert set(rows) == {str(p) for p in photos.rglob("*.*")}
    assert "empty file" in rows[str(photos / "sub" / "empty.png")]["error"]
    assert "broken.jpg" in rows[str(photos / "sub" / "broken.jpg")]["error"]

    cap = Captioner.load(BUNDLE, runtime="torch")
    for name in ("chelsea.jpg", "coffee.jpg"):
        row, ref = rows[str(photos / name)], cap.caption(photos / name, beam_size=2)
        assert row["error"] is None
        assert row["caption"] == ref.text  # the same captions as the single-process path
        assert row["logprob"] == pytest.approx(ref.score, abs=1e-3)
        assert json.loads(row["nbest"])[0]["caption"] == ref.text
        assert json.loads(row["decoding"])["beam_size"] == 2
        assert row["model"] == "resnet50-attention" and len(row["bundle_sha256"]) == 64

    # resume: a new photo and a shard left half-written by a killed run
    shutil.copy(SAMPLES / "rocket.jpg", photos / "rocket.jpg")
    (out / "killed_000003-0.parquet").write_bytes(b"PAR1\x00\x00 cut short")
    again = run_batch(BatchConfig(str(BUNDLE), str(photos), str(out), workers=1, **torch_rt))
    assert (again.already_done, again.captioned, again.errors) == (4, 1, 0)
    assert len(again.set_aside) == 1
    paths = [r["path"] for r in _rows(out)]
    assert len(paths) == len(set(paths)) == 5  # no path twice

    nothing = run_batch(BatchConfig(str(BUNDLE), str(photos), str(out), **torch_rt))
    assert (nothing.already_done, nothing.captioned) == (5, 0)
    with pytest.raises(ValueError, match="use another --out"):
        run_batch(BatchConfig(str(BUNDLE), str(photos), str(out), beam=3, runtime="torch"))


def test_batch_cli_errors_are_one_line(tmp_path, capsys):
    from captioning.cli import main

    assert main(["batch", "--model", str(tmp_path / "nobundle"), str(tmp_path), "--out", "x"]) == 2
    assert "no model bundle" in capsys.readouterr().err
    if BUNDLE.is_dir():
        missing = tmp_path / "missing.txt"
        assert main(["batch", "--model", str(BUNDLE), str(missing), "--out", str(tmp_path)]) == 2
        assert "missing.txt: no such file" in capsys.readouterr().err
