"""The HTTP API: captions by multipart and raw bytes, errors as JSON, limits, micro-batching.

The fast tests serve ``ToneCaptioner``, a stand-in model that names each image's tone from its
pixels, so the app, routes, batcher and limits run in-process without loading a network; the
slow ones serve the shipped bundle (and on uvicorn) and compare with the library.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
import warnings
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

with warnings.catch_warnings():  # starlette 1.x: "install httpx2 instead"; httpx works
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

from captioning.bundle.format import BUNDLE_FORMAT, BundleError, bundle_decoding  # noqa: E402
from captioning.data.images import ImageLoadError  # noqa: E402
from captioning.data.vocab import SPECIALS, Vocabulary  # noqa: E402
from captioning.inference.captioner import CaptionResult, prefix_word_ids  # noqa: E402
from captioning.inference.labels import ClassifierLabels, classifier_labels  # noqa: E402
from captioning.models.decoding import MAX_BEAM, DecodeConfig  # noqa: E402
from captioning.serving.app import ServeConfig, create_app  # noqa: E402
from captioning.serving.batcher import MicroBatcher  # noqa: E402
from captioning.serving.errors import ApiError  # noqa: E402
from captioning.serving.loading import load_captioner  # noqa: E402
from captioning.serving.loadtest import (  # noqa: E402
    LoadConfig,
    format_report,
    free_port,
    run_level,
    sample_images,
)
from captioning.serving.schemas import CaptionResponse, Health, ModelInfo  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "artifacts" / "samples"
BUNDLE = REPO / "artifacts" / "models" / "resnet50-attention"
needs_bundle = pytest.mark.skipif(
    not BUNDLE.is_dir(), reason="shipped bundle resnet50-attention is absent"
)
BRIGHT, DARK = "a bright picture", "a dark picture"


class ToneCaptioner:
    """A stand-in model: "a bright picture" or "a dark picture" from the pixels' mean (after
    the prefix, when one is given); every ``caption_pixels`` call is recorded as (batch size,
    beam), and ``fail`` makes it raise. Its vocabulary is those words plus "photo"; prefixes
    are checked against it as a bundle's are, and labels come from the real classifier."""

    runtime = "tone"
    precision_label = "fp32"

    def __init__(self, path: Path) -> None:
        self.path, self.name = path, path.name
        self.config = json.loads((path / "config.json").read_text())
        self.defaults = bundle_decoding(self.config)
        self.vocab = Vocabulary(list(SPECIALS) + ["a", "bright", "dark", "picture", "photo"])
        self.calls: list[tuple[int, int]] = []
        self.prefixes: list[str | None] = []
        self.fail = False

    def decode_config(self, beam_size: int | None = None, **overrides) -> DecodeConfig:
        return bundle_decoding(self.config, beam_size, **overrides)

    def prefix_ids(self, prefix: str | None, cfg: DecodeConfig) -> tuple[int, ...]:
        return prefix_word_ids(self.vocab, self.name, prefix, cfg)

    def labels(self, image, k: int) -> ClassifierLabels:
        return classifier_labels([self.config["encoder"]], image, k)

    def caption(self, image: Image.Image, beam_size: int | None = None) -> CaptionResult:
        return CaptionResult("a warm-up", ["a", "warm-up"], -1.0, [], None)

    def caption_pixels(
        self, pixels: torch.Tensor, beam_size: int, prefix: str | None = None
    ) -> list[CaptionResult]:
        self.calls.append((pixels.shape[0], beam_size))  # pixels [N, 3, 224, 224]
        self.prefixes.append(prefix)
        if self.fail:
            raise RuntimeError("the model broke")
        out = []
        for mean in pixels.mean(dim=(1, 2, 3)).tolist():
            text, other = (BRIGHT, DARK) if mean > 0.5 else (DARK, BRIGHT)
            if prefix:
                text, other = f"{prefix} {text}", f"{prefix} {other}"
            nbest = [(text, -mean), (other, -mean - 1.0)][:beam_size]
            timings = {"encode_ms": 1.0, "decode_ms": 2.0}
            res = CaptionResult(text, text.split(), -mean, nbest, None, timings, mean, prefix or "")
            out.append(res)
        return out


def make_tone_bundle(folder: Path) -> Path:
    """A bundle folder ``folder/tone`` with a readable config (weights are never loaded)."""
    path = folder / "tone"
    path.mkdir(exist_ok=True)
    config = {
        "format": BUNDLE_FORMAT,
        "encoder": "resnet50",
        "decoder": "attention",
        "encoder_sha256": "0" * 64,
        "decoder_config": {},
        "decode_defaults": {"beam_size": 3},
    }
    (path / "config.json").write_text(json.dumps(config))
    (path / "decoder.safetensors").write_bytes(b"")
    (path / "vocab.json").write_text("[]")
    return path


@pytest.fixture(scope="module")
def tone_bundle(tmp_path_factory) -> Path:
    return make_tone_bundle(tmp_path_factory.mktemp("models"))


@pytest.fixture
def tone(tone_bundle) -> ToneCaptioner:
    return ToneCaptioner(tone_bundle)


@pytest.fixture
def client(tone, tone_bundle):
    with TestClient(create_app(ServeConfig(model=str(tone_bundle)), captioner=tone)) as c:
        yield c


def _jpeg(name: str = "chelsea.jpg") -> bytes:
    return (SAMPLES / name).read_bytes()


def _png(gray: int, size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (gray, gray, gray)).save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- the app, in-process


def test_caption_by_multipart_and_raw_body(client, tone):
    r = client.post("/v1/caption?beam=2", files={"file": ("white.png", _png(250), "image/png")})
    assert r.status_code == 200, r.text
    body = CaptionResponse.model_validate(r.json())
    assert (body.caption, body.beam, body.batch_size) == (BRIGHT, 2, 1)
    assert [h.caption for h in body.nbest] == [BRIGHT, DARK]
    assert body.model == "tone" and body.runtime == "tone"
    assert {"queue_ms", "image_ms", "encode_ms", "decode_ms", "batch_ms", "total_ms"} == set(
        body.timings
    )

    raw = client.post("/v1/caption", content=_png(5), headers={"content-type": "image/png"})
    assert raw.status_code == 200, raw.text
    assert raw.json()["caption"] == DARK and raw.json()["beam"] == 3  # the bundle's default

    form = client.post("/v1/caption", files={"file": ("c.jpg", _jpeg())}, data={"beam": "1"})
    assert form.json()["beam"] == 1 and len(form.json()["nbest"]) == 1
    assert tone.calls == [(1, 2), (1, 3), (1, 1)]


def test_bad_requests_get_json_errors_and_the_server_keeps_serving(client, tone):
    bad = client.post("/v1/caption", files={"file": ("evil.jpg", b"\xff\xd8\xff garbage")})
    assert bad.status_code == 422
    assert bad.json()["error"] == "bad_image" and "evil.jpg" in bad.json()["detail"]

    truncated = client.post("/v1/caption", content=_jpeg()[:2000])
    assert truncated.status_code == 422 and "truncated" in truncated.json()["detail"]

    empty = client.post("/v1/caption", content=b"")
    assert empty.status_code == 400 and empty.json()["error"] == "no_image"
    nofile = client.post("/v1/caption", files={"note": (None, "no image here")})
    assert nofile.status_code == 400 and nofile.json()["error"] == "no_image"
    for beam in ("x", "0"):
        r = client.post("/v1/caption", files={"file": ("c.jpg", _jpeg())}, data={"beam": beam})
        assert r.status_code == 422 and r.json()["error"] == "bad_beam"
    over = client.post("/v1/caption?beam=11", content=_jpeg())
    assert over.status_code == 422 and over.json()["error"] == "bad_beam"
    assert client.post("/v1/caption?beam=0", content=_jpeg()).status_code == 422
    assert tone.calls == []  # none of these reached the model

    ok = client.post("/v1/caption", files={"file": ("c.jpg", _jpeg())})
    assert ok.status_code == 200
    tone.fail = True
    broken = client.post("/v1/caption", content=_jpeg())
    assert broken.status_code == 500 and broken.json()["error"] == "inference_failed"
    assert "the model broke" in broken.json()["detail"]
    tone.fail = False
    assert client.post("/v1/caption", content=_jpeg()).status_code == 200


def test_models_healthz_and_docs(client, tone_bundle):
    (info,) = client.get("/v1/models").json()
    info = ModelInfo.model_validate(info)
    assert (info.name, info.encoder, info.decoder, info.runtime) == (
        "tone",
        "resnet50",
        "attention",
        "tone",
    )
    assert info.decode_defaults == {"beam_size": 3} and info.max_beam == MAX_BEAM
    assert info.members is None and info.test_metrics is None  # no ensemble, no evaluation
    client.post("/v1/caption", content=_png(128))
    health = Health.model_validate(client.get("/healthz").json())
    assert (health.status, health.model, health.queued) == ("ok", "tone", 0)
    assert (health.batches, health.requests) == (1, 1)

    docs = client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    spec = client.get("/openapi.json").json()
    assert {"/v1/caption", "/v1/models", "/healthz"} <= set(spec["paths"])
    post = spec["paths"]["/v1/caption"]["post"]
    assert {"multipart/form-data", "application/octet-stream"} <= set(
        post["requestBody"]["content"]
    )
    assert {"200", "400", "413", "422", "503"} <= set(post["responses"])
    assert {"CaptionResponse", "ErrorResponse", "ModelInfo", "Health"} <= set(
        spec["components"]["schemas"]
    )


def test_size_limit_and_decompression_bombs(tone, tone_bundle):
    cfg = ServeConfig(model=str(tone_bundle), max_body_mb=0.02, max_pixels=100_000)
    with TestClient(create_app(cfg, captioner=tone)) as c:
        big = _jpeg("astronaut.jpg")  # 68 kB > 20 kB
        r = c.post("/v1/caption", content=big)
        assert r.status_code == 413 and r.json()["error"] == "too_large"

        def chunks():  # no Content-Length: counted while reading
            for i in range(0, len(big), 4096):
                yield big[i : i + 4096]

        r = c.post("/v1/caption", content=chunks())
        assert r.status_code == 413 and r.json()["error"] == "too_large"
        r = c.post("/v1/caption", files={"file": ("big.jpg", big)})  # multipart over the limit
        assert r.status_code == 413 and r.json()["error"] == "too_large"

        bomb = _png(0, size=1000)  # 1 Mpx > 0.1 Mpx, a few kB
        r = c.post("/v1/caption", files={"file": ("bomb.png", bomb)})
        assert r.status_code == 422 and "bomb.png" in r.json()["detail"]
        assert c.post("/v1/caption", content=_png(0, size=300)).status_code == 200
    assert tone.calls == [(1, 3)]


def test_serve_config_refuses_bad_limits():
    assert ServeConfig(model="m", max_body_mb=0.5).max_body_bytes == 512 * 1024
    limits = ("max_batch", "max_queue", "max_beam", "max_body_mb")
    for bad in [{name: 0} for name in limits] + [{"max_wait_ms": -1}]:
        with pytest.raises(ValueError):
            ServeConfig(model="m", **bad)


def test_load_captioner_refuses_a_missing_bundle(tmp_path):
    with pytest.raises(BundleError, match="no model bundle"):
        load_captioner(tmp_path / "nobundle", runtime="torch")


# ---------------------------------------------------------------- the micro-batcher


def test_micro_batcher_groups_by_beam_and_answers_each_request(tone):
    bright, dark = _png(250), _png(5)

    async def scenario():
        b = MicroBatcher(tone, max_batch=8, max_wait_s=0.3, max_queue=64)
        await b.start()
        jobs = [b.submit(data, f"b1-{i}", 1) for i, data in enumerate((bright, dark, bright))]
        jobs += [b.submit(data, f"b2-{i}", 2) for i, data in enumerate((dark, bright))]
        jobs.append(b.submit(b"junk", "junk.jpg", 2))
        out = await asyncio.gather(*jobs, return_exceptions=True)
        await b.stop()
        return b, out

    batcher, out = asyncio.run(scenario())
    assert (batcher.batches, batcher.requests) == (2, 6)
    assert tone.calls == [(3, 1), (2, 2)]  # the bad image drops out of its batch
    assert [r["caption"] for r in out[:5]] == [BRIGHT, DARK, BRIGHT, DARK, BRIGHT]
    assert [r["beam"] for r in out[:5]] == [1, 1, 1, 2, 2]
    assert [r["batch_size"] for r in out[:5]] == [3, 3, 3, 2, 2]
    assert isinstance(out[5], ImageLoadError) and "junk.jpg" in str(out[5])


def test_micro_batcher_captions_one_prefix_per_batch(tone):
    async def scenario():
        b = MicroBatcher(tone, max_batch=8, max_wait_s=0.3, max_queue=64)
        await b.start()
        jobs = [b.submit(_png(250), f"p{i}.png", 2, "a photo" if i % 2 else "") for i in range(4)]
        out = await asyncio.gather(*jobs)
        await b.stop()
        return out

    out = asyncio.run(scenario())
    assert tone.prefixes == [None, "a photo"]  # two batches, one per prefix
    assert [r["caption"] for r in out] == [BRIGHT, f"a photo {BRIGHT}"] * 2
    assert [r["prefix"] for r in out] == ["", "a photo"] * 2
    assert [r["batch_size"] for r in out] == [2, 2, 2, 2]


def test_prefix_by_form_or_query_and_a_word_outside_the_vocabulary_is_named(client, tone):
    r = client.post("/v1/caption", files={"file": ("w.png", _png(250))}, data={"prefix": "a photo"})
    assert r.status_code == 200, r.text
    assert r.json()["caption"] == f"a photo {BRIGHT}" and r.json()["prefix"] == "a photo"
    q = client.post("/v1/caption?prefix=A%20Photo", content=_png(5))
    assert q.json()["caption"] == f"A Photo {DARK}" and 0 <= q.json()["confidence"] <= 1
    bad = client.post("/v1/caption", files={"file": ("w.png", _png(9))}, data={"prefix": "a cat"})
    assert bad.status_code == 422 and set(bad.json()) == {"error", "detail"}
    assert bad.json()["error"] == "bad_prefix" and "'cat' is not in the vocabulary" in bad.text
    long = client.post(
        "/v1/caption", files={"file": ("w.png", _png(9))}, data={"prefix": "a" * 201}
    )
    assert long.status_code == 422 and long.json()["error"] == "bad_prefix"
    assert tone.prefixes == ["a photo", "A Photo"]  # refused prefixes never reach the model


@pytest.mark.parametrize("labels", ["0", "21", "abc"])
def test_a_bad_labels_count_is_refused_as_json(client, labels):
    form = client.post("/v1/caption", files={"file": ("w.png", _png(9))}, data={"labels": labels})
    query = client.post(f"/v1/caption?labels={labels}", content=_png(9))
    for r in (form, query):
        assert r.status_code == 422 and set(r.json()) == {"error", "detail"}
        assert "labels" in r.json()["detail"] and labels in r.json()["detail"]


@pytest.mark.slow  # builds the ResNet50 classifier
def test_labels_are_the_encoders_imagenet_opinion(client):
    r = client.post("/v1/caption", files={"file": ("c.jpg", _jpeg())}, data={"labels": "3"})
    assert r.status_code == 200, r.text
    labels = CaptionResponse.model_validate(r.json()).labels
    assert labels.source == "resnet50 ImageNet classifier" and labels.unavailable is None
    assert [x.label for x in labels.top][0] == "Egyptian cat" and len(labels.top) == 3
    plain = client.post("/v1/caption", content=_jpeg())
    assert plain.json()["labels"] is None


def test_micro_batcher_batches_at_most_max_batch(tone):
    async def scenario():
        b = MicroBatcher(tone, max_batch=2, max_wait_s=0.3, max_queue=64)
        await b.start()
        out = await asyncio.gather(*(b.submit(_png(9), f"{i}.png", 1) for i in range(5)))
        await b.stop()
        return out

    out = asyncio.run(scenario())
    assert [r["batch_size"] for r in out] == [2, 2, 2, 2, 1]
    assert tone.calls == [(2, 1), (2, 1), (1, 1)]


def test_micro_batcher_refuses_overload_and_stops_cleanly(tone):
    async def scenario():
        b = MicroBatcher(tone, max_batch=8, max_wait_s=30.0, max_queue=1)
        await b.start()
        waiting = asyncio.create_task(b.submit(_png(9), "first.png", 1))
        await asyncio.sleep(0.05)  # the first request now waits for company
        with pytest.raises(ApiError) as overloaded:
            await b.submit(_png(9), "second.png", 1)
        depth = b.depth
        await b.stop()
        with pytest.raises(ApiError) as stopped:
            await waiting
        return depth, overloaded.value, stopped.value

    depth, overloaded, stopped = asyncio.run(scenario())
    assert depth == 1
    assert (overloaded.status, overloaded.code) == (503, "overloaded")
    assert (stopped.status, stopped.code) == (503, "shutting_down")
    assert tone.calls == []


# ---------------------------------------------------------------- the load test


def test_load_level_against_the_app_in_process(tone, tone_bundle):
    app = create_app(ServeConfig(model=str(tone_bundle), max_wait_ms=20), captioner=tone)
    images = sample_images()
    assert [name for name, _ in images] == sorted(p.name for p in SAMPLES.glob("*.jpg"))

    async def scenario():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            return await run_level("http://serve.test", 3, images, 6, 60.0, 2, 60.0, transport)

    level = asyncio.run(scenario())
    assert (level["clients"], level["requests"], level["ok"], level["errors"]) == (3, 6, 6, 0)
    assert 0 < level["p50_ms"] <= level["p99_ms"] and level["requests_per_s"] > 0
    assert sum(n for n, _ in tone.calls) == 6 and {beam for _, beam in tone.calls} == {2}
    rep = {"model": "tone", "runtime": "tone", "precision": "fp32", "beam": 2}
    rep |= {"levels": [level], "speedup_top_vs_1": None}
    table = format_report(rep).splitlines()
    assert table[0] == "tone on tone (fp32), beam 2" and table[2].split()[:3] == ["3", "6", "0"]


def test_load_config_stays_on_loopback():
    with pytest.raises(ValueError, match="loopback"):
        LoadConfig(url="http://example.com:8000")
    with pytest.raises(ValueError, match="positive"):
        LoadConfig(levels=(1, 0))
    assert LoadConfig(url="http://127.0.0.1:8000").levels == (1, 8, 32)


def test_serve_cli_refuses_a_missing_bundle_in_one_line(tmp_path, capsys):
    from captioning.cli import main

    assert main(["serve", "--model", str(tmp_path / "nobundle"), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no model bundle" in err and "Traceback" not in err


# ---------------------------------------------------------------- the shipped bundle


@pytest.fixture(scope="module")
def cap():
    if not BUNDLE.is_dir():
        pytest.skip("shipped bundle resnet50-attention is absent")
    from captioning import Captioner

    return Captioner.load(BUNDLE, runtime="torch")  # the reference; nothing cached outside tmp


@pytest.mark.slow
@needs_bundle
def test_the_shipped_bundle_serves_the_librarys_captions(cap):
    with TestClient(create_app(ServeConfig(model=str(BUNDLE)), captioner=cap)) as client:
        r = client.post("/v1/caption?beam=2", files={"file": ("chelsea.jpg", _jpeg())})
        assert r.status_code == 200, r.text
        body = r.json()
        ref = cap.caption(SAMPLES / "chelsea.jpg", beam_size=2)
        assert body["caption"] == ref.text and body["beam"] == 2
        assert body["logprob"] == pytest.approx(ref.score, abs=1e-3)
        assert [h["caption"] for h in body["nbest"]] == [t for t, _ in ref.nbest]
        assert body["model"] == "resnet50-attention" and body["runtime"]

        raw = client.post("/v1/caption", content=_jpeg())
        assert raw.status_code == 200, raw.text
        assert raw.json()["beam"] == cap.defaults.beam_size
        assert raw.json()["caption"] == cap.caption(SAMPLES / "chelsea.jpg").text

        (info,) = client.get("/v1/models").json()
        assert info["name"] == "resnet50-attention" and info["encoder"] == "resnet50"
        assert info["test_metrics"]["n_images"] > 0  # the bundle's recorded test scores


@pytest.mark.slow
@needs_bundle
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


@pytest.mark.slow
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
    single = Captioner.load(models / "resnet50-attention", precision="fp32", runtime="torch")
    with TestClient(create_app(ServeConfig(model=str(BUNDLE)), captioner=single)) as c:
        assert c.get("/v1/models").json()[0]["members"] is None
