"""Flickr8k loading: both layouts, every kind of bad line, missing files, and the real data."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from captioning.data import (
    DATA_ENV,
    CaptionDataset,
    DataError,
    load_dataset,
    load_flickr8k,
    resolve_data_dir,
)
from captioning.data.flickr8k import hash_split
from captioning.data.images import load_image

SAMPLES = sorted((Path(__file__).resolve().parents[1] / "artifacts" / "samples").glob("*.jpg"))

SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


def make_images(folder: Path, names: list[str]) -> None:
    """Real photos (the shipped samples, in turn) under the given file names."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        shutil.copyfile(SAMPLES[i % len(SAMPLES)], folder / name)


def make_official(
    root: Path,
    token_lines: list[str],
    splits: dict[str, list[str]],
    images: list[str],
    image_dir: str = "Images",
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    make_images(root / image_dir, images)
    (root / "Flickr8k.token.txt").write_text("\n".join(token_lines) + "\n")
    for split, file in SPLIT_FILES.items():
        (root / file).write_text("\n".join(splits.get(split, [])) + "\n")
    return root


def five(name: str, stem: str) -> list[str]:
    return [f"{name}#{i}\t{stem} number {i} ." for i in range(5)]


@pytest.fixture
def official(tmp_path) -> Path:
    lines = [
        *five("a.jpg", "A dog runs"),
        *five("b.jpg", "A cat sleeps"),
        "c.jpg#0\tA bird , flying .",
        "c.jpg#1\ta bird flying",  # duplicate of #0 after tokenization
        "c.jpg#2\t   ",  # empty caption
        "c.jpg#3\tA bird on a branch .",
        "",  # blank lines are ignored silently
        "no tab here",
        "d.jpg\tno hash before the tab",
        *five("ghost.jpg.1", "Orphan caption"),  # image file does not exist
        "e.jpg#0\tCaptioned but in no split .",
    ]
    splits = {
        "train": ["a.jpg", "  b.jpg  ", "", "missing.jpg"],
        "dev": ["c.jpg", "a.jpg"],
        "test": ["nocaps.jpg", "ghost.jpg.1"],
    }
    images = ["a.jpg", "b.jpg", "c.jpg", "e.jpg", "nocaps.jpg", "notes.txt"]
    return make_official(tmp_path / "flickr", lines, splits, images)


def test_official_layout_captions_and_splits(official):
    ds = load_flickr8k(official)
    assert isinstance(ds, CaptionDataset)
    assert ds.layout == "flickr8k-official" and ds.split_note == "official Flickr8k split"
    assert ds.name == "Flickr8k" and ds.split_source == "official" and ds.split_seed is None
    assert ds.images_dir == official / "Images"
    assert sorted(ds.captions) == ["a.jpg", "b.jpg", "c.jpg", "e.jpg"]
    assert ds.captions["a.jpg"] == [f"A dog runs number {i} ." for i in range(5)]
    assert ds.captions["c.jpg"] == ["A bird , flying .", "A bird on a branch ."]
    assert ds.splits == {"train": ["a.jpg", "b.jpg"], "dev": ["c.jpg"], "test": []}
    assert ds.split_captions("dev") == {"c.jpg": ds.captions["c.jpg"]}
    assert ds.image_path("a.jpg") == official / "Images" / "a.jpg"
    assert load_image(ds.image_path("a.jpg")).size == (512, 512)  # a real photo (astronaut)
    with pytest.raises(KeyError, match="unknown split"):
        ds.split_captions("val")


def test_official_layout_reports_every_skip(official):
    ds = load_flickr8k(official)
    assert ds.skip_counts == {
        "malformed": 2,
        "missing image": 5,
        "empty caption": 1,
        "duplicate": 1,
    }
    assert ds.skipped_lines == 9
    text = "\n".join(ds.skipped)
    assert "Flickr8k.token.txt:16: malformed line (no tab)" in text
    assert "Flickr8k.token.txt:17: malformed line (expected IMAGE#N" in text
    assert "skipped 5 line(s) (lines 18-22) for ghost.jpg.1: no such file in Images/" in text
    assert "Flickr8k.token.txt:13: empty caption for c.jpg" in text
    assert "Flickr8k.token.txt:12: duplicate caption for c.jpg" in text
    train_report = "Flickr_8k.trainImages.txt: dropped 1 image(s) (no image file in Images/)"
    assert f"{train_report}: missing.jpg" in text
    assert "Flickr_8k.devImages.txt: dropped 1 image(s) (already in the train split): a.jpg" in text
    assert "Flickr_8k.testImages.txt: dropped 1 image(s) (no captions): nocaps.jpg" in text
    assert "no image file in Images/): ghost.jpg.1" in text
    summary = ds.summary()
    assert "Flickr8k (flickr8k-official layout)" in summary
    assert "train 2, dev 1, test 0 (official Flickr8k split; split source: official)" in summary
    assert "captions: 13 for 4 images (1-5 per image)" in summary
    assert "skipped lines: 9" in summary
    assert ds.describe() == (
        "Flickr8k (flickr8k-official layout), official Flickr8k split "
        "(2 train / 1 dev / 0 test images)"
    )


def test_official_layout_without_image_check_keeps_orphans(official):
    ds = load_flickr8k(official, check_images=False)
    assert "ghost.jpg.1" in ds.captions
    assert ds.splits["test"] == ["ghost.jpg.1"]
    assert "missing image" not in ds.skip_counts


def test_official_alternative_image_folder(tmp_path):
    root = make_official(
        tmp_path / "f", five("a.jpg", "x"), {"train": ["a.jpg"]}, ["a.jpg"], "Flicker8k_Dataset"
    )
    ds = load_flickr8k(root)
    assert ds.images_dir == root / "Flicker8k_Dataset" and ds.splits["train"] == ["a.jpg"]


def test_crlf_and_bom_are_tolerated(tmp_path):
    root = make_official(tmp_path / "f", [], {"train": ["a.jpg"]}, ["a.jpg"])
    (root / "Flickr8k.token.txt").write_bytes("\ufeffa.jpg#0\tOne .\r\na.jpg#1\tTwo .\r\n".encode())
    (root / SPLIT_FILES["train"]).write_bytes(b"a.jpg\r\n\r\n")
    ds = load_flickr8k(root)
    assert ds.captions == {"a.jpg": ["One .", "Two ."]} and ds.splits["train"] == ["a.jpg"]


KAGGLE_CSV = """image,caption
a.jpg,A dog runs .
a.jpg,"A dog, brown and white, runs ."
a.jpg,"He said ""hello"" to the dog ."
a.jpg,a dog runs
a.jpg,
b.jpg,A cat sleeps
b.jpg,A cat, unquoted comma, sleeps
orphan.jpg,Nobody is here .
just-one-field
,caption without image
"""


def make_kaggle(root: Path, text: str, images: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    make_images(root / "Images", images)
    (root / "captions.txt").write_text(text)
    return root


def test_kaggle_layout(tmp_path):
    root = make_kaggle(tmp_path / "k", KAGGLE_CSV, ["a.jpg", "b.jpg"])
    ds = load_flickr8k(root)
    assert ds.layout == "flickr8k-kaggle" and ds.split_source == "hash"
    assert "NOT the official" in ds.split_note
    assert ds.captions["a.jpg"] == [
        "A dog runs .",
        "A dog, brown and white, runs .",
        'He said "hello" to the dog .',
    ]
    assert ds.captions["b.jpg"] == ["A cat sleeps", "A cat, unquoted comma, sleeps"]
    assert ds.skip_counts == {
        "malformed": 2,
        "missing image": 1,
        "empty caption": 1,
        "duplicate": 1,
    }
    text = "\n".join(ds.skipped)
    assert "captions.txt:5: duplicate caption for a.jpg" in text
    assert "captions.txt:6: empty caption for a.jpg" in text
    assert "for orphan.jpg: no such file in Images/" in text
    assert "captions.txt:10: malformed line" in text
    assert sorted(ds.splits["train"] + ds.splits["dev"] + ds.splits["test"]) == ["a.jpg", "b.jpg"]
    assert "NOT the official" in ds.summary()


def test_kaggle_split_is_deterministic_and_proportional():
    names = [f"{i:05d}.jpg" for i in range(8091)]
    split = hash_split(list(reversed(names)))
    assert [len(split[s]) for s in ("train", "dev", "test")] == [6000, 1000, 1091]
    assert split == hash_split(names)
    first = min(names, key=lambda n: hashlib.sha1(n.encode()).hexdigest())
    assert split["train"][0] == first
    assert set(split["train"]).isdisjoint(split["dev"] + split["test"])
    small = hash_split(names[:100])
    assert [len(small[s]) for s in ("train", "dev", "test")] == [76, 12, 12]
    assert [len(hash_split(names[:3])[s]) for s in ("train", "dev", "test")] == [3, 0, 0]


def test_kaggle_with_nothing_usable_is_an_error(tmp_path):
    root = make_kaggle(tmp_path / "k", "image\tcaption\nx.jpg\tcap\n", ["x.jpg"])
    with pytest.raises(DataError, match="no usable captions"):
        load_flickr8k(root)


def test_missing_captions_file_names_both_layouts(tmp_path):
    (tmp_path / "Images").mkdir()
    with pytest.raises(DataError) as info:
        load_flickr8k(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "Flickr8k.token.txt" in message and "captions.txt" in message
    assert "--data DIR" in message and DATA_ENV in message


def test_missing_split_file(official):
    (official / SPLIT_FILES["dev"]).unlink()
    with pytest.raises(DataError, match=r"Flickr_8k\.devImages\.txt is missing from .*flickr"):
        load_flickr8k(official)


def test_missing_image_folder(tmp_path):
    root = make_official(tmp_path / "f", five("a.jpg", "x"), {"train": ["a.jpg"]}, [])
    (root / "Images").rmdir()
    with pytest.raises(DataError, match="no image folder .*Images/ or Flicker8k_Dataset/"):
        load_flickr8k(root)
    ds = load_flickr8k(root, check_images=False)
    assert ds.splits["train"] == ["a.jpg"]


def test_resolve_data_dir_argument_env_and_errors(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(DataError, match=f"--data DIR.*{DATA_ENV}"):
        resolve_data_dir(None)
    assert resolve_data_dir(tmp_path) == tmp_path
    assert resolve_data_dir(str(tmp_path)) == tmp_path

    monkeypatch.setenv(DATA_ENV, str(tmp_path / "from-env"))
    with pytest.raises(DataError, match=rf"from-env \(from \${DATA_ENV}\) does not exist"):
        resolve_data_dir(None)
    (tmp_path / "from-env").mkdir()
    assert resolve_data_dir(None) == tmp_path / "from-env"
    assert resolve_data_dir(tmp_path) == tmp_path  # the argument wins over the environment

    with pytest.raises(DataError, match=r"nowhere \(from --data\) does not exist\.$"):
        resolve_data_dir(tmp_path / "nowhere")  # no "Pass --data": it was passed
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match="not a directory"):
        resolve_data_dir(tmp_path / "file")


def test_load_uses_environment_variable(official, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(official))
    assert load_flickr8k().root == official


def test_bad_data_dir_is_one_clean_cli_line(tmp_path, capsys):
    """A DataError reaches the user as one ``error:`` line and exit 2, never a traceback."""
    from captioning.cli import main

    (tmp_path / "Images").mkdir()
    assert main(["data", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and str(tmp_path) in err


def test_real_flickr8k(flickr8k_dir):
    ds = load_flickr8k(flickr8k_dir)
    assert ds.layout == "flickr8k-official"
    assert len(ds.captions) == 8091
    assert {s: len(v) for s, v in ds.splits.items()} == {"train": 6000, "dev": 1000, "test": 1000}
    assert "2258277193_586949ec62.jpg.1" not in ds.captions
    assert ds.skip_counts.get("missing image") == 5
    assert ds.skip_counts.get("malformed", 0) == 0
    # 14 captions repeat word for word ignoring case; 5 more differ only in case and punctuation
    # (e.g. a missing final "."), which tokenize() also makes identical.
    assert ds.skip_counts.get("duplicate") == 19
    assert sum(len(c) for c in ds.captions.values()) == 40460 - 5 - 19
    assert all(1 <= len(c) <= 5 for c in ds.captions.values())
    train, dev, test = (set(ds.splits[s]) for s in ("train", "dev", "test"))
    assert not (train & dev or train & test or dev & test)
    assert ds.image_path(ds.splits["test"][0]).is_file()


def test_load_dataset_reads_both_flickr8k_layouts_like_load_flickr8k(official, tmp_path):
    for root in (official, make_kaggle(tmp_path / "k", KAGGLE_CSV, ["a.jpg", "b.jpg"])):
        direct, detected = load_flickr8k(root), load_dataset(root)
        assert (detected.layout, detected.captions, detected.splits) == (
            direct.layout,
            direct.captions,
            direct.splits,
        )
        assert detected.skipped == direct.skipped
    # a caption file given instead of its folder is read from that folder
    assert load_dataset(official / "Flickr8k.token.txt").root == official
