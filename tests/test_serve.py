"""The HTTP API: captions by multipart and raw bytes, errors as JSON, limits, micro-batching."""

from __future__ import annotations

import asyncio
import io
import threading
import time
import warnings
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from PIL import Image  # noqa: E402

with warnings.catch_warnings():  # starlette 1.x: "install httpx2 instead"; httpx works
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

from captioning.serving.app import MicroBatcher, ServeConfig, create_app  # noqa: E402
from captioning.serving.loadtest import LoadConfig, free_port, run_level, sample_images  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "artifacts" / "samples"
BUNDLE = REPO / "artifacts" / "models" / "resnet50-attention"
pytestmark = pytest.mark.skipif(
    not BUNDLE.is_dir(), reason="shipped bundle resnet50-attention is absent"
)


@pytest.fixture(scope="module")
def cap():
    from captioning import Captioner

    return Captioner.load(BUNDLE, runtime="torch")  # the reference; nothing cached outside tmp


@pytest.fixture(scope="module")
def client(cap):
    with TestClient(create_app(ServeConfig(model=str(BUNDLE)), captioner=cap)) as c:
        yield c


def _jpeg(name: str = "chelsea.jpg") -> bytes:
    return (SAMPLES / name).read_bytes()


def test_caption_multipart_and_raw_bytes_agree_with_the_library(client, cap):
    r = client.post("/v1/caption?beam=2", files={"file": ("chelsea.jpg", _jpeg(), "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = cap.caption(SAMPLES / "chelsea.jpg", beam_size=2)
    assert body["caption"] == ref.text and body["beam"] == 2
    assert body["logprob"] == pytest.approx(ref.score, abs=1e-3)
    assert [h["caption"] for h in body["nbest"]] == [t for t, _ in ref.nbest]
    assert body["model"] == "resnet50-attention" and body["runtime"]
    assert {"queue_ms", "encode_ms", "decode_ms", "total_ms"} <= set(body["timings"])

    raw = client.post(
        "/v1/caption", content=_jpeg(), headers={"content-type": "application/octet-stream"}
    )
    assert raw.status_code == 200, raw.text
    default_beam = cap.defaults.beam_size
    assert raw.json()["beam"] == default_beam
    assert raw.json()["caption"] == cap.caption(SAMPLES / "chelsea.jpg").text

    form_beam = client.post("/v1/caption", files={"file": ("c.jpg", _jpeg())}, data={"beam": "1"})
    assert form_beam.json()["beam"] == 1


def test_bad_requests_get_json_errors_and_the_server_keeps_serving(client):
    bad = client.post("/v1/caption", files={"file": ("evil.jpg", b"\xff\xd8\xff garbage")})
    assert bad.status_code == 422
    assert bad.json()["error"] == "bad_image" and "evil.jpg" in bad.json()["detail"]

    truncated = client.post("/v1/caption", content=_jpeg()[:2000])
    assert truncated.status_code == 422 and "truncated" in truncated.json()["detail"]

    empty = client.post("/v1/caption", content=b"")
    assert empty.status_code == 400 and empty.json()["error"] == "no_image"
    nofile = client.post("/v1/caption", data={"beam": "2"}, files={"other": ("x", b"")})
    assert nofile.status_code in (400, 422)
    assert client.post("/v1/caption?beam=11", content=_jpeg()).status_code == 422
    assert client.post("/v1/caption?beam=0", content=_jpeg()).status_code == 422

    ok = client.post("/v1/caption", files={"file": ("c.jpg", _jpeg())})
    assert ok.status_code == 200


def test_models_healthz_and_docs(client):
    models = client.get("/v1/models").json()
    assert [m["name"] for m in models] == ["resnet50-attention"]
    assert models[0]["encoder"] == "resnet50" and models[0]["max_beam"] >= 5
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["requests"] >= 0
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/caption", "/v1/models", "/healthz"} <= set(spec["paths"])
    body = spec["paths"]["/v1/caption"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/octet-stream"} <= set(body)


def test_size_limit_and_decompression_bombs(cap):
    cfg = ServeConfig(model=str(BUNDLE), max_body_mb=0.02, max_pixels=100_000)
    with TestClient(create_app(cfg, captioner=cap)) as c:
        big = _jpeg("astronaut.jpg")  # 68 kB > 20 kB
        r = c.post("/v1/caption", content=big)
        assert r.status_code == 413 and r.json()["error"] == "too_large"

        def chunks():  # no Content-Length: counted while reading
            for i in range(0, len(big), 4096):
                yield big[i : i + 4096]

        r = c.post("/v1/caption", content=chunks())
        assert r.status_code == 413 and r.json()["error"] == "too_large"

        buf = io.BytesIO()
        Image.new("RGB", (1000, 1000)).save(buf, "PNG")  # 1 Mpx > 0.1 Mpx, a few kB
        r = c.post("/v1/caption", files={"file": ("bomb.png", buf.getvalue())})
        assert r.status_code == 422 and "bomb.png" in r.json()["detail"]
        small = io.BytesIO()
        Image.open(SAMPLES / "rocket.jpg").resize((200, 200)).save(small, "JPEG")
        assert c.post("/v1/caption", content=small.getvalue()).status_code == 200


def test_micro_batcher_groups_by_beam(cap):
    from captioning.data.images import ImageLoadError

    data = _jpeg()

    async def scenario():
        b = MicroBatcher(cap, max_batch=8, max_wait_s=0.3, max_queue=64)
        await b.start()
        jobs = [b.submit(data, f"b1-{i}", 1) for i in range(3)]
        jobs += [b.submit(data, f"b2-{i}", 2) for i in range(2)]
        jobs.append(b.submit(b"junk", "junk.jpg", 2))
        out = await asyncio.gather(*jobs, return_exceptions=True)
        await b.stop()
        return b, out

    batcher, out = asyncio.run(scenario())
    assert batcher.batches == 2
    assert [r["batch_size"] for r in out[:3]] == [3, 3, 3]
    assert [r["beam"] for r in out[:5]] == [1, 1, 1, 2, 2]
    assert [r["batch_size"] for r in out[3:5]] == [2, 2]  # the bad image drops out of its batch
    assert isinstance(out[5], ImageLoadError) and "junk.jpg" in str(out[5])


def test_real_server_concurrent_requests_and_healthz_during_load(cap):
    import uvicorn

    port = free_port()
    app = create_app(ServeConfig(model=str(BUNDLE), max_wait_ms=20), captioner=cap)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)

        async def load():
            async with httpx.AsyncClient(timeout=120) as http:
                done: list[float] = []

                async def one(i):
                    r = await http.post(
                        f"{url}/v1/caption?beam=5", files={"file": (f"{i}.jpg", _jpeg())}
                    )
                    done.append(time.perf_counter())
                    return r

                tasks = [asyncio.create_task(one(i)) for i in range(6)]
                await asyncio.sleep(0.05)
                t0 = time.perf_counter()
                health = await http.get(f"{url}/healthz")
                t_health = time.perf_counter()
                results = await asyncio.gather(*tasks)
                return results, health, t_health - t0, t_health, max(done)

        results, health, health_s, t_health, t_last = asyncio.run(load())
        assert all(r.status_code == 200 for r in results)
        assert len({r.json()["caption"] for r in results}) == 1  # same photo, same caption
        assert max(r.json()["batch_size"] for r in results) > 1  # batched, not one by one
        assert health.status_code == 200 and health_s < 2.0
        assert t_health < t_last  # answered while captions were still being computed

        level = asyncio.run(run_level(url, 3, sample_images(), 4, 60.0, 1, 120.0))  # bench-serve
        assert (level["clients"], level["ok"], level["errors"]) == (3, 4, 0)
        assert 0 < level["p50_ms"] <= level["p99_ms"] and level["requests_per_s"] > 0
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_load_config_stays_on_loopback():
    with pytest.raises(ValueError, match="loopback"):
        LoadConfig(url="http://example.com:8000")
    assert LoadConfig(url="http://127.0.0.1:8000").levels == (1, 8, 32)


def test_serve_cli_refuses_a_missing_bundle_in_one_line(tmp_path, capsys):
    from captioning.cli import main

    assert main(["serve", "--model", str(tmp_path / "nobundle"), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no model bundle" in err and "Traceback" not in err


def test_an_ensemble_serves_and_lists_its_members(tiny_world, tmp_path):
    import shutil

    from captioning import Captioner
    from captioning.bundle.ensemble import make_ensemble

    models = tmp_path / "models"
    shutil.copytree(tiny_world.models, models, ignore=shutil.ignore_patterns("train_state"))
    make_ensemble(models / "ens", ("resnet50-attention", "vgg16-attention"), [3.0, 1.0])
    ens = Captioner.load(models / "ens", precision="fp32", runtime="torch")
    with TestClient(create_app(ServeConfig(model=str(models / "ens")), captioner=ens)) as c:
        (info,) = c.get("/v1/models").json()
        assert info["decoder"] == "ensemble" and info["encoder"] == "resnet50,vgg16"
        assert info["members"] == [{"name": "resnet50-attention", "weight": 0.75},
                                   {"name": "vgg16-attention", "weight": 0.25}]  # fmt: skip
        got = c.post("/v1/caption", files={"file": ("c.jpg", _jpeg())})
        assert got.status_code == 200, got.text
        assert got.json()["caption"] == ens.caption(SAMPLES / "chelsea.jpg").text
    with TestClient(create_app(ServeConfig(model=str(BUNDLE)), captioner=Captioner.load(
            models / "resnet50-attention", precision="fp32", runtime="torch"))) as c:  # fmt: skip
        assert c.get("/v1/models").json()[0]["members"] is None
