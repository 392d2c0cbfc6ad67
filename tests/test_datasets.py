"""COCO 2017, Karpathy split files and Flickr30k: small real-photo data sets built in each test,
every kind of bad input, layout detection, and the Karpathy split against official Flickr8k."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captioning.cli import main
from captioning.data import (
    LAYOUTS,
    DataError,
    detect_layout,
    load_coco,
    load_dataset,
    load_flickr8k,
    load_flickr30k,
    load_karpathy,
)
from captioning.data.images import load_image
from captioning.data.reading import hash_order
from captioning.models.bleu import corpus_bleu_scores
from captioning.models.cider import CiderD
from captioning.models.coco import coco_scores
from tests.test_data import make_images

ALL_LAYOUT_IDS = tuple(LAYOUTS)


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def assert_names_every_layout(message: str) -> None:
    for layout in ALL_LAYOUT_IDS:
        assert layout in message, (layout, message)


# ---------------------------------------------------------------- COCO 2017

SEVEN = [f"A cat number {i} sits on a warm mat ." for i in range(7)]


def coco_json(images: list[tuple[int, str]], annotations: list) -> dict:
    return {
        "info": {"description": "test"},
        "images": [{"id": i, "file_name": f, "width": 8, "height": 6} for i, f in images],
        "annotations": annotations,
    }


def ann(i: int, image_id, caption) -> dict:
    return {"id": i, "image_id": image_id, "caption": caption}


@pytest.fixture
def coco(tmp_path) -> Path:
    root = tmp_path / "coco"
    train = [(i, f"{i:012d}.jpg") for i in range(1, 10)]  # 9 train images
    val = [(100, "000000000100.jpg"), (101, "000000000101.jpg")]
    make_images(root / "train2017", [f for _, f in train])
    make_images(root / "val2017", [f for _, f in val])
    anns = [ann(k, 1, c) for k, c in enumerate(SEVEN)]  # 7 references
    anns += [ann(100 + 10 * i + k, i, f"Photo {i} caption {k} .") for i in range(2, 10)
             for k in range(5)]  # fmt: skip
    anns += [
        ann(900, 2, "Photo 2 caption 5 ."),  # a 6th reference
        ann(901, 3, "   "),  # empty caption
        ann(902, 3, "photo 3 caption 0"),  # duplicate of an earlier one, after tokenization
        ann(903, 77, "Unknown image id ."),
        {"id": 904, "image_id": 4},  # no caption
        "not an object",
    ]
    write_json(root / "annotations" / "captions_train2017.json", coco_json(train, anns))
    val_anns = [ann(1000 + k, 100, f"A rocket {k} on the pad .") for k in range(5)]
    val_anns += [ann(1010 + k, 101, f"A mug of coffee {k} .") for k in range(5)]
    val_anns += [ann(1020 + k, 102, "An image whose file is absent .") for k in range(2)]
    val_images = [*val, (102, "000000000102.jpg")]  # listed, but no such file
    write_json(root / "annotations" / "captions_val2017.json", coco_json(val_images, val_anns))
    return root


def test_coco_captions_splits_and_all_references(coco):
    ds = load_coco(coco)
    assert (ds.name, ds.layout, ds.split_source) == ("COCO 2017", "coco2017", "coco2017")
    assert ds.images_dir == coco
    assert ds.captions["train2017/000000000001.jpg"] == SEVEN
    assert len(ds.captions["train2017/000000000002.jpg"]) == 6
    assert len(ds.captions["train2017/000000000003.jpg"]) == 5  # empty + duplicate skipped
    train_names = [f"train2017/{i:012d}.jpg" for i in range(1, 10)]
    assert ds.splits["dev"] == hash_order(train_names)[:1]  # 9 // 8 images
    assert sorted(ds.splits["train"] + ds.splits["dev"]) == train_names
    assert ds.splits["test"] == ["val2017/000000000100.jpg", "val2017/000000000101.jpg"]
    assert load_image(ds.image_path("val2017/000000000100.jpg")).size[0] > 100  # real photo
    assert "5-7 per image" in ds.summary() and "train 8, dev 1, test 2" in ds.summary()


def test_coco_reports_every_bad_annotation(coco):
    ds = load_coco(coco)
    assert ds.skip_counts == {
        "malformed": 3,
        "missing image": 2,
        "empty caption": 1,
        "duplicate": 1,
    }
    text = "\n".join(ds.skipped)
    assert "captions_train2017.json annotation 48: empty caption for train2017/" in text
    assert "captions_train2017.json annotation 49: duplicate caption for train2017/" in text
    assert "annotation 50: malformed annotation (image_id 77 is not in images)" in text
    assert "annotation 51: malformed annotation (no caption text)" in text
    assert (
        "captions_val2017.json: skipped 2 caption(s) (annotations 10-11) for "
        "val2017/000000000102.jpg: no such file"
    ) in text


def test_coco_seven_references_all_reach_the_metrics(coco):
    ds = load_coco(coco)
    image = "train2017/000000000001.jpg"
    refs = ds.split_captions("train" if image in ds.splits["train"] else "dev")
    assert len(refs[image]) == 7
    # the hypothesis is the 7th reference: 100 only if all 7 references are scored
    assert corpus_bleu_scores({image: SEVEN[6]}, refs)["bleu4"] == pytest.approx(100.0)
    assert corpus_bleu_scores({image: SEVEN[6]}, {image: SEVEN[:5]})["bleu4"] < 100.0
    # CIDEr-D over images with 5, 6 and 7 references: the fast reward agrees with pycocoevalcap
    train = {n: ds.captions[n] for n in ds.splits["train"] + ds.splits["dev"]}
    assert sorted({len(r) for r in train.values()}) == [5, 6, 7]
    hyps = {n: r[-1] if i % 2 else "a photo of a thing" for i, (n, r) in enumerate(train.items())}
    fast = CiderD(train).score(list(hyps.values()), list(hyps))  # [N], coco's scale
    slow = coco_scores(hyps, train, meteor=False)["cider"]  # 0-100 scale
    assert 100 * float(fast.mean()) == pytest.approx(slow) and slow > 0


def test_coco_missing_or_malformed_annotation_file_is_reported_and_skipped(coco):
    val = coco / "annotations" / "captions_val2017.json"
    val.unlink()
    ds = load_coco(coco)
    assert ds.splits["test"] == [] and len(ds.splits["train"]) == 8
    assert ds.skip_counts["unreadable file"] == 1
    assert "captions_val2017.json: missing from" in "\n".join(ds.skipped)

    val.write_text('{"images": [')  # truncated download
    ds = load_coco(coco)
    assert ds.skip_counts["unreadable file"] == 1
    assert "captions_val2017.json: skipped: captions_val2017.json is not valid JSON" in (
        "\n".join(ds.skipped)
    )
    (coco / "annotations" / "captions_train2017.json").unlink()
    with pytest.raises(DataError, match="no usable COCO captions"):
        load_coco(coco)


def test_coco_json_of_another_shape_names_the_layouts(coco):
    write_json(coco / "annotations" / "captions_train2017.json", {"categories": []})
    with pytest.raises(DataError, match="is not a COCO captions file") as info:
        load_coco(coco)
    assert_names_every_layout(str(info.value))


def test_coco_missing_image_folder(coco):
    for f in (coco / "val2017").iterdir():
        f.unlink()
    (coco / "val2017").rmdir()
    with pytest.raises(DataError, match=r"no image folder .*val2017/ for captions_val2017\.json"):
        load_coco(coco)
    ds = load_coco(coco, check_images=False)
    assert len(ds.splits["test"]) == 3  # the absent 102 is kept without the image check


# ---------------------------------------------------------------- Karpathy split files


def sentence(raw: str) -> dict:
    return {"raw": raw, "tokens": raw.lower().rstrip(" .").split()}


def kimage(filename: str, split: str, raws: list[str], filepath: str | None = None) -> dict:
    entry = {"filename": filename, "split": split, "sentences": [sentence(r) for r in raws]}
    if filepath is not None:
        entry["filepath"] = filepath
    return entry


@pytest.fixture
def karpathy8k(tmp_path) -> Path:
    root = tmp_path / "k8k"
    make_images(root / "Images", ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"])
    images = [
        kimage("a.jpg", "train", ["A dog runs .", "A dog is running ."]),
        kimage("b.jpg", "restval", ["A cat sleeps ."]),
        kimage("c.jpg", "val", ["A bird flies .", "a bird flies"]),  # duplicate
        kimage("d.jpg", "test", ["A fish swims ."]),
        {"filename": "e.jpg", "split": "test", "sentences": [{"raw": "", "tokens": []}]},
        {"filename": "e.jpg", "split": "test", "sentences": [{"tokens": ["only", "tokens"]}]},
        kimage("ghost.jpg", "train", ["Nobody is here .", "Still nobody ."]),
        {"filename": "f.jpg", "split": "holdout", "sentences": []},
        {"split": "train", "sentences": []},
        {"filename": "g.jpg", "split": "train"},
        {"filename": "d.jpg", "split": "test", "sentences": [{"text": "no raw or tokens"}]},
    ]
    write_json(root / "dataset_flickr8k.json", {"images": images, "dataset": "flickr8k"})
    return root


def test_karpathy_flickr8k_splits_and_captions(karpathy8k):
    ds = load_karpathy(karpathy8k)
    assert (ds.name, ds.layout, ds.split_source) == ("Flickr8k", "karpathy", "karpathy")
    assert "restval counted as train" in ds.split_note
    assert ds.images_dir == karpathy8k / "Images"
    assert ds.splits == {"train": ["a.jpg", "b.jpg"], "dev": ["c.jpg"], "test": ["d.jpg", "e.jpg"]}
    assert ds.captions["a.jpg"] == ["A dog runs .", "A dog is running ."]
    assert ds.captions["c.jpg"] == ["A bird flies ."]
    assert ds.captions["e.jpg"] == ["only tokens"]  # tokens stand in for an absent raw
    assert load_image(ds.image_path("d.jpg")).size[0] > 100


def test_karpathy_reports_every_bad_entry(karpathy8k):
    ds = load_karpathy(karpathy8k)
    assert ds.skip_counts == {
        "malformed": 4,
        "missing image": 2,
        "empty caption": 1,
        "duplicate": 1,
    }
    text = "\n".join(ds.skipped)
    assert "dataset_flickr8k.json image 2: duplicate caption for c.jpg" in text
    assert "dataset_flickr8k.json image 4: empty caption for e.jpg" in text
    assert "skipped 2 caption(s) (image 6) for ghost.jpg: no such file in Images/" in text
    assert "image 7: malformed image (split 'holdout' is not one of" in text
    assert "image 8: malformed image (no filename)" in text
    assert "image 9: malformed image (no sentences list)" in text
    assert "image 10: malformed image (a sentence without raw or tokens)" in text
    assert "(test): dropped 2 image(s) (listed twice): e.jpg, d.jpg" in text
    assert "(train+restval): dropped 1 image(s) (no image file in Images/): ghost.jpg" in text


def test_karpathy_coco_uses_filepath(tmp_path):
    root = tmp_path / "coco2014"
    make_images(root / "train2014", ["COCO_train2014_000000000001.jpg"])
    make_images(root / "val2014", ["COCO_val2014_000000000002.jpg", "COCO_val2014_3.jpg"])
    images = [
        kimage("COCO_train2014_000000000001.jpg", "train", SEVEN[:6], "train2014"),
        kimage("COCO_val2014_000000000002.jpg", "restval", SEVEN[:5], "val2014"),
        kimage("COCO_val2014_3.jpg", "test", SEVEN, "val2014"),
    ]
    write_json(root / "dataset_coco.json", {"images": images, "dataset": "coco"})
    ds = load_dataset(root)
    assert (ds.name, ds.layout) == ("COCO 2014", "karpathy")
    assert ds.splits == {
        "train": [
            "train2014/COCO_train2014_000000000001.jpg",
            "val2014/COCO_val2014_000000000002.jpg",
        ],
        "dev": [],
        "test": ["val2014/COCO_val2014_3.jpg"],
    }
    assert ds.captions["val2014/COCO_val2014_3.jpg"] == SEVEN
    assert ds.image_path("val2014/COCO_val2014_3.jpg").is_file()
    for f in (root / "train2014").iterdir():
        f.unlink()
    (root / "train2014").rmdir()
    with pytest.raises(DataError, match=r"no image folder .*train2014/ \(named by filepath"):
        load_karpathy(root)


def test_karpathy_file_given_directly_and_bad_json(karpathy8k, tmp_path):
    file = karpathy8k / "dataset_flickr8k.json"
    assert load_dataset(file).splits == load_karpathy(karpathy8k).splits
    # a renamed split file still works when its "dataset" key says which data set it is
    renamed = karpathy8k / "my_split.json"
    renamed.write_text(file.read_text())
    assert load_dataset(renamed).name == "Flickr8k"

    other = write_json(karpathy8k / "other.json", {"hello": [1, 2]})
    with pytest.raises(DataError, match="other.json holds an object with keys hello") as info:
        load_dataset(other)
    assert 'no "images" list; expected a Karpathy split file, {"images":' in str(info.value)
    assert "`python -m captioning data --help`" in str(info.value)

    coco_like = write_json(tmp_path / "captions.json", coco_json([(1, "a.jpg")], []))
    with pytest.raises(DataError, match="COCO-style images \\+ annotations") as info:
        load_dataset(coco_like)
    assert "annotations/captions_train2017.json and captions_val2017.json" in str(info.value)

    file.write_text('{"images": [{"filename": ')
    with pytest.raises(DataError, match="dataset_flickr8k.json is not valid JSON"):
        load_karpathy(karpathy8k)


def test_several_karpathy_files_need_a_choice(karpathy8k):
    (karpathy8k / "dataset_flickr30k.json").write_text("{}")
    with pytest.raises(DataError, match="several Karpathy split files"):
        load_karpathy(karpathy8k)


@pytest.mark.slow
def test_karpathy_flickr8k_gives_the_official_split(flickr8k_dir, tmp_path):
    """A Karpathy-style JSON made from the official files reads as the same 6000/1000/1000."""
    official = load_flickr8k(flickr8k_dir)
    root = tmp_path / "karpathy"
    root.mkdir()
    (root / "Images").symlink_to(official.images_dir)  # the real photos, not a copy
    ours = {"train": "train", "dev": "val", "test": "test"}
    images = []
    for split, names in official.splits.items():
        for i, name in enumerate(names):
            # Karpathy's COCO file calls part of its train split "restval": it is train too
            theirs = "restval" if split == "train" and i % 7 == 3 else ours[split]
            images.append(kimage(name, theirs, official.captions[name]))
    write_json(root / "dataset_flickr8k.json", {"images": images, "dataset": "flickr8k"})
    ds = load_dataset(root)
    assert ds.layout == "karpathy" and ds.split_source == "karpathy"
    assert {s: len(v) for s, v in ds.splits.items()} == {"train": 6000, "dev": 1000, "test": 1000}
    assert ds.splits == official.splits
    assert ds.captions == {n: official.captions[n] for s in ds.splits.values() for n in s}
    assert ds.skipped == [] and ds.skip_counts == {}


# ---------------------------------------------------------------- Flickr30k

F30K_NAMES = [f"{1000092795 + i}.jpg" for i in range(16)]


def token_lines(names: list[str]) -> list[str]:
    return [f"{n}#{k}\tPicture {n} shows thing {k} ." for n in names for k in range(5)]


@pytest.fixture
def flickr30k(tmp_path) -> Path:
    root = tmp_path / "f30k"
    make_images(root / "flickr30k-images", F30K_NAMES)
    lines = token_lines(F30K_NAMES)
    lines += [
        "1000092795.jpg#5\t   ",  # empty caption
        "no tab on this line",
        "9999999999.jpg#0\tAn image that is absent .",
    ]
    (root / "results_20130124.token").write_text("\n".join(lines) + "\n")
    return root


def test_flickr30k_token_file_and_seeded_split(flickr30k):
    ds = load_flickr30k(flickr30k)
    assert (ds.name, ds.layout) == ("Flickr30k", "flickr30k-token")
    assert ds.split_source == "seeded" and ds.split_seed == 0
    assert sorted(ds.captions) == sorted(F30K_NAMES)
    assert all(len(c) == 5 for c in ds.captions.values())
    assert {s: len(v) for s, v in ds.splits.items()} == {"train": 12, "dev": 2, "test": 2}
    order = hash_order(F30K_NAMES, 0)
    assert ds.splits == {"train": order[:12], "dev": order[12:14], "test": order[14:]}
    assert ds.skip_counts == {"malformed": 1, "missing image": 1, "empty caption": 1}
    assert "results_20130124.token:82: malformed line (no tab)" in "\n".join(ds.skipped)
    summary = ds.summary()
    assert "NOT the Karpathy split" in summary and "seed 0" in summary
    assert "split source: seeded" in summary

    again = load_flickr30k(flickr30k)
    assert again.splits == ds.splits  # deterministic
    other = load_flickr30k(flickr30k, seed=1)
    assert other.split_seed == 1 and other.splits != ds.splits
    assert sorted(sum(other.splits.values(), [])) == sorted(F30K_NAMES)


def test_flickr30k_uses_the_karpathy_split_when_present(flickr30k):
    karpathy_images = [
        kimage(F30K_NAMES[0], "train", ["ignored: captions come from the token file"]),
        kimage(F30K_NAMES[1], "restval", []),
        kimage(F30K_NAMES[2], "val", []),
        kimage(F30K_NAMES[3], "test", []),
        kimage("4444444444.jpg", "test", []),  # no captions, no image
        {"filename": F30K_NAMES[4], "split": "dev", "sentences": []},
    ]
    write_json(flickr30k / "dataset_flickr30k.json", {"images": karpathy_images})
    ds = load_dataset(flickr30k)
    assert ds.layout == "flickr30k-token" and ds.split_source == "karpathy"
    assert ds.split_seed is None
    assert ds.splits == {
        "train": F30K_NAMES[:2],
        "dev": [F30K_NAMES[2]],
        "test": [F30K_NAMES[3]],
    }
    assert ds.captions[F30K_NAMES[0]][0] == f"Picture {F30K_NAMES[0]} shows thing 0 ."
    text = "\n".join(ds.skipped)
    assert "dataset_flickr30k.json image 5: malformed image (split 'dev' is not one of" in text
    assert "(test): dropped 1 image(s) (no image file in flickr30k-images/): 4444444444.jpg" in text
    assert "dataset_flickr30k.json: 12 captioned image(s) are in no split" in text
    assert "Karpathy split from dataset_flickr30k.json" in ds.summary()


KAGGLE_30K = """image_name| comment_number| comment
1000092795.jpg| 0| Two young guys with shaggy hair look at their hands .
1000092795.jpg| 1| Two young , White males are outside near many bushes .
1000092795.jpg| 2| A sign reads | open | in the window .
1000092795.jpg| 3|
1000092795.jpg| x| A comment number that is not a number .
1000092796.jpg| 0| A dog runs across the grass .
1000092796.jpg| 4   A dog runs across the grass .
1000092796.jpg| 1| two young guys with shaggy hair look at their hands
"""


def test_flickr30k_kaggle_csv(tmp_path):
    root = tmp_path / "kaggle30k"
    make_images(root / "flickr30k_images", ["1000092795.jpg", "1000092796.jpg"])
    (root / "results.csv").write_text(KAGGLE_30K)
    ds = load_dataset(root)
    assert (ds.name, ds.layout, ds.split_source) == ("Flickr30k", "flickr30k-kaggle", "seeded")
    assert ds.images_dir == root / "flickr30k_images"
    assert ds.captions["1000092795.jpg"] == [
        "Two young guys with shaggy hair look at their hands .",
        "Two young , White males are outside near many bushes .",
        "A sign reads | open | in the window .",
    ]
    assert ds.captions["1000092796.jpg"] == [
        "A dog runs across the grass .",
        "two young guys with shaggy hair look at their hands",  # another image: no duplicate
    ]
    assert ds.skip_counts == {"malformed": 2, "empty caption": 1}
    text = "\n".join(ds.skipped)
    assert "results.csv:6: malformed line (comment number 'x' is not a number)" in text
    assert "results.csv:8: malformed line (expected image| number| caption)" in text
    assert "results.csv:5: empty caption for 1000092795.jpg" in text


def test_flickr30k_without_captions_or_images(tmp_path):
    root = tmp_path / "f"
    make_images(root / "flickr30k-images", ["1.jpg"])
    with pytest.raises(DataError, match="no Flickr30k captions file"):
        load_flickr30k(root)
    (root / "results.csv").write_text("image_name| comment_number| comment\n")
    with pytest.raises(DataError, match="no usable captions \\(file is empty\\)"):
        load_flickr30k(root)
    (root / "results.csv").write_text("1.jpg| 0| One photo .\n")
    for f in (root / "flickr30k-images").iterdir():
        f.unlink()
    (root / "flickr30k-images").rmdir()
    with pytest.raises(DataError, match="no image folder .*flickr30k-images/ or flickr30k_images/"):
        load_flickr30k(root)


# ---------------------------------------------------------------- detection and the CLI


def test_detect_layout_of_every_folder(coco, karpathy8k, flickr30k, tmp_path):
    assert detect_layout(coco) == ("coco2017", coco)
    assert detect_layout(karpathy8k) == ("karpathy", karpathy8k)
    assert detect_layout(flickr30k) == ("flickr30k-token", flickr30k)
    val = coco / "annotations" / "captions_val2017.json"
    assert detect_layout(val) == ("coco2017", coco)  # an annotation file means its COCO folder
    assert load_dataset(val).layout == "coco2017"
    # official Flickr8k files win over a Karpathy file beside them
    (karpathy8k / "Flickr8k.token.txt").write_text("a.jpg#0\tA dog .\n")
    assert detect_layout(karpathy8k)[0] == "flickr8k-official"

    empty = tmp_path / "nothing"
    empty.mkdir()
    write_json(empty / "stuff.json", {"a": 1})
    with pytest.raises(DataError, match="no known caption layout .*found stuff.json") as info:
        load_dataset(empty)
    assert_names_every_layout(str(info.value))
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="notes.txt is not a caption file of a known layout"):
        load_dataset(empty / "notes.txt")


def test_data_command_prints_layout_and_summary(coco, flickr30k, tmp_path, capsys):
    assert main(["data", "--data", str(coco)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("layout: coco2017 (COCO 2017:")
    assert "COCO 2017 (coco2017 layout)" in out and "train 8, dev 1, test 2" in out
    assert main(["data", "--data", str(flickr30k), "-v"]) == 0
    out = capsys.readouterr().out
    assert "layout: flickr30k-token" in out and "skipped: results_20130124.token:82" in out

    (tmp_path / "x").mkdir()
    assert main(["data", "--data", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no known caption layout") and "Traceback" not in err
