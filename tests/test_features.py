"""Feature cache: extraction, resume after a kill, stale-cache refusal, and real Flickr8k images."""

from __future__ import annotations

import dataclasses
import os

import pytest
import skimage.data
import torch
from PIL import Image
from safetensors.torch import load_file

from captioning.data import load_flickr8k
from captioning.models.encoders import build_encoder, preprocess
from captioning.runtime.features import FeatureCache, StaleCacheError, extract


@pytest.fixture(scope="module")
def resnet():
    return build_encoder("resnet50", "fp32")


@pytest.fixture
def photos(tmp_path):
    out = []
    for name in ("chelsea", "coffee", "astronaut", "rocket", "camera"):
        arr = getattr(skimage.data, name)()
        path = tmp_path / f"{name}.png"
        Image.fromarray(arr).save(path)
        out.append((f"{name}.png", path))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    out.append(("broken.jpg", tmp_path / "broken.jpg"))
    return out


def test_extract_writes_fp16_pooled_and_grid(resnet, photos, tmp_path):
    cache = FeatureCache.for_encoder(resnet, tmp_path / "cache")
    report = extract(resnet, photos, cache, batch_size=2, shard_size=4, progress=False)
    assert report.new_images == 6 and report.total_images == 5
    assert list(report.failed) == ["broken.jpg"]
    feats = cache.load()
    assert feats.pooled.shape == (5, 2048) and feats.grid.shape == (5, 49, 2048)
    assert feats.pooled.dtype == torch.float16
    direct = resnet.encode(preprocess(Image.open(photos[1][1]).convert("RGB"))[None])
    i = feats.index["coffee.png"]
    torch.testing.assert_close(feats.grid[i].float(), direct.grid[0], rtol=1e-2, atol=1e-2)
    assert resnet.sha256[:12] in cache.directory.name


def test_extract_resumes_after_a_kill(resnet, photos, tmp_path):
    photos = photos[:5]
    cache = FeatureCache.for_encoder(resnet, tmp_path / "cache")
    calls = {"n": 0}
    real_encode = resnet.encode

    def dying_encode(x):
        calls["n"] += 1
        if calls["n"] > 2:  # dies inside the second shard
            raise KeyboardInterrupt
        return real_encode(x)

    killed = dataclasses.replace(resnet)
    killed.encode = dying_encode
    with pytest.raises(KeyboardInterrupt):
        extract(killed, photos, cache, batch_size=1, shard_size=2, progress=False)
    assert cache.cached_names() == {"chelsea.png", "coffee.png"}
    assert not list(cache.directory.glob("*.tmp"))

    report = extract(resnet, photos, cache, batch_size=1, shard_size=2, progress=False)
    assert report.new_images == 3 and report.total_images == 5
    resumed = cache.load()
    fresh_cache = FeatureCache.for_encoder(resnet, tmp_path / "fresh")
    extract(resnet, photos, fresh_cache, batch_size=5, progress=False)
    fresh = fresh_cache.load()
    for name in fresh.names:
        torch.testing.assert_close(
            resumed.grid[resumed.index[name]], fresh.grid[fresh.index[name]], rtol=0, atol=2e-3
        )


def test_stale_cache_is_refused(resnet, photos, tmp_path):
    cache = FeatureCache.for_encoder(resnet, tmp_path / "cache")
    extract(resnet, photos[:1], cache, progress=False)
    other = dataclasses.replace(cache, weights_sha256="0" * 64)
    with pytest.raises(StaleCacheError, match="delete it"):
        other.load()


def test_load_subset_and_missing(resnet, photos, tmp_path):
    cache = FeatureCache.for_encoder(resnet, tmp_path / "cache")
    extract(resnet, photos[:3], cache, progress=False)
    sub = cache.load(["coffee.png"])
    assert sub.names == ["coffee.png"] and sub.grid.shape[0] == 1
    with pytest.raises(KeyError, match="extract"):
        cache.load(["rocket.png"])


@pytest.mark.slow
def test_extract_real_flickr8k_images(flickr8k_dir, tmp_path):
    ds = load_flickr8k(flickr8k_dir)
    names = ds.splits["dev"][:4]
    for name in ("vgg16", "resnet50"):
        enc = build_encoder(name, "fp32")
        cache = FeatureCache.for_encoder(enc, tmp_path)
        extract(enc, [(n, ds.image_path(n)) for n in names], cache, progress=False)
        feats = cache.load(names)
        assert feats.grid.shape == (4, enc.spec.grid_cells, enc.spec.grid_channels)
        assert torch.isfinite(feats.grid.float()).all() and feats.pooled.abs().sum() > 0


def test_failed_images_are_retried_once_fixed(resnet, photos, tmp_path):
    """An image that could not be read is tried again on the next run, and leaves ``failed``."""
    cache = FeatureCache.for_encoder(resnet, tmp_path / "cache")
    broken = photos[-1]
    first = extract(resnet, [photos[0], broken], cache, progress=False)
    assert list(first.failed) == ["broken.jpg"]
    assert cache.cached_names() == {"chelsea.png"}

    Image.fromarray(skimage.data.coffee()).save(broken[1], format="JPEG")  # the file is fixed
    second = extract(resnet, [photos[0], broken], cache, progress=False)
    assert second.new_images == 1 and second.failed == {}
    assert cache.cached_names() == {"chelsea.png", "broken.jpg"}
    assert cache.manifest()["failed"] == {}
    assert cache.load(["broken.jpg"]).grid.shape == (1, 49, 2048)


def test_safetensors_writes_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    """A crash right after the rename must not publish a file whose bytes never reached disk."""
    from captioning.core import files as fileio

    events = []
    real_fsync, real_replace = fileio.os.fsync, fileio.os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    monkeypatch.setattr(fileio.os, "replace", replace)
    fileio.atomic_save_safetensors(tmp_path / "w.safetensors", {"x": torch.ones(3)})
    (_, tmp), *_ = (e for e in events if e[0] == "replace")
    assert events.index(("fsync", tmp)) < events.index(("replace", tmp))
    assert ("fsync", str(tmp_path)) in events  # the directory entry too
    assert load_file(tmp_path / "w.safetensors")["x"].tolist() == [1.0, 1.0, 1.0]


def test_tests_never_write_to_the_home_cache(
    resnet, photos, tmp_path, tmp_path_factory, monkeypatch
):
    """conftest points ``$CAPTIONING_CACHE`` at a temp dir, so the default cache is private."""
    from captioning.core.paths import default_cache_dir

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    root = default_cache_dir()
    assert root.is_relative_to(tmp_path_factory.getbasetemp()) and not root.is_relative_to(home)
    extract(resnet, photos[:1], FeatureCache.for_encoder(resnet), progress=False)
    assert any(root.rglob("manifest.json")) and not home.exists()
