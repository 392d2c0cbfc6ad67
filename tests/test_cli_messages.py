"""The CLI's messages for mistaken input: each one names what is wrong, fits on a line or two,
and shows no traceback; nothing is written.

Covered: a ``--limit`` that is not a positive number, ensemble and soup members that do not
exist (or an ensemble written away from its members), a data folder with no recognised layout,
and a JSON data file that is not a Karpathy split file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from captioning.cli import EXIT_USER_ERROR, build_parser, main
from captioning.data import LAYOUTS
from tests.test_bundle_format import make_bundle

EXIT_BAD_INPUT = 2  # what main returns for a library error (argparse exits with the same code)
SHORT = 200  # characters in a message's first line, besides the paths it names


def error_lines(capsys) -> list[str]:
    """The stderr lines of the last command, checked to be an error without a traceback."""
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    assert "Traceback" not in err
    return err.rstrip("\n").splitlines()


def first_line_without(line: str, *paths: Path) -> str:
    for p in paths:
        line = line.replace(str(p), "P")
    return line


# ---------------------------------------------------------------- --limit


LIMITED = [
    ["evaluate", "--model", "m"],
    ["extract", "--encoder", "resnet50"],
    ["soup", "a", "b", "--out", "o", "--greedy"],
]


@pytest.mark.parametrize("argv", LIMITED, ids=[a[0] for a in LIMITED])
@pytest.mark.parametrize("limit", ["0", "-3"])
def test_a_limit_below_one_is_refused(argv, limit, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--limit", limit])
    assert e.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert f"argument --limit: must be at least 1, got {limit}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", LIMITED, ids=[a[0] for a in LIMITED])
def test_a_positive_limit_is_taken_and_no_limit_means_every_image(argv):
    parser = build_parser([argv[0]])
    assert parser.parse_args([*argv, "--limit", "1"]).limit == 1
    assert parser.parse_args(argv).limit == 0  # 0: the library's "all images"


def test_every_limit_of_the_cli_is_checked():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    with_limit = sorted(
        name
        for name, p in sub.choices.items()
        if any("--limit" in a.option_strings for a in p._actions)
    )
    assert with_limit == sorted(a[0] for a in LIMITED)


# ---------------------------------------------------------------- ensemble and soup members


@pytest.fixture
def models(tmp_path, monkeypatch):
    """A models directory with two tiny bundles, ``a`` and ``b``, that share a vocabulary."""
    root = tmp_path / "models"
    make_bundle(root / "a")
    make_bundle(root / "b", seed=1)
    monkeypatch.setenv("CAPTIONING_MODELS", str(root))
    return root


def test_ensemble_names_the_missing_member(models, capsys):
    assert main(["ensemble", "a", "nope"]) == EXIT_BAD_INPUT
    (line,) = error_lines(capsys)
    assert line.startswith("error: no model bundle 'nope' ")
    assert line.endswith(f"in {models}); available: a, b")
    assert "'a'" not in line
    assert len(first_line_without(line, models)) < SHORT
    assert sorted(p.name for p in models.iterdir()) == ["a", "b"]


def test_ensemble_names_every_missing_member(models, capsys):
    assert main(["ensemble", "nope", "a", "gone"]) == EXIT_BAD_INPUT
    (line,) = error_lines(capsys)
    assert line.startswith("error: no model bundles 'nope', 'gone' ")


def test_ensemble_written_elsewhere_still_names_the_missing_member(models, tmp_path, capsys):
    out = tmp_path / "elsewhere" / "ens"
    out.parent.mkdir()
    assert main(["ensemble", "a", "nope", "--out", str(out)]) == EXIT_BAD_INPUT
    (line,) = error_lines(capsys)
    assert line.startswith("error: no model bundle 'nope' ") and "'a'" not in line
    assert not out.exists()


def test_ensemble_written_away_from_its_members_says_where_it_goes(models, tmp_path, capsys):
    out = tmp_path / "elsewhere" / "ens"
    out.parent.mkdir()
    assert main(["ensemble", "a", "b", "--out", str(out)]) == EXIT_BAD_INPUT
    (line,) = error_lines(capsys)
    assert f"{out.parent} has no a, b (they are in {models})" in line
    assert line.endswith(f"--out {models / 'ens'}")
    assert not out.exists()


def test_ensemble_of_members_given_by_path_goes_beside_them(models, capsys):
    assert main(["ensemble", str(models / "a"), "b"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (models / "a-b" / "config.json").is_file()


def test_soup_names_every_missing_member_before_any_work(models, tmp_path, capsys):
    out = tmp_path / "soup"
    assert main(["soup", "a", "nope", "gone", "--out", str(out)]) == EXIT_BAD_INPUT
    (line,) = error_lines(capsys)
    assert line.startswith("error: no model bundles 'nope', 'gone' ")
    assert not out.exists()


# ---------------------------------------------------------------- a folder without data


def assert_no_layout_message(lines: list[str], folder: Path, source: str, what: str) -> None:
    assert lines[0] == f"error: no known caption layout in {folder} (from {source}): {what}"
    assert len(first_line_without(lines[0], folder)) < SHORT
    assert all(layout in lines[1] for layout in LAYOUTS)
    assert "`python -m captioning data --help`" in lines[1]


@pytest.fixture
def empty(tmp_path) -> Path:
    folder = tmp_path / "data" / "empty"
    folder.mkdir(parents=True)
    return folder


def test_an_empty_data_folder_is_named_and_the_layouts_listed(empty, capsys):
    assert main(["data", "--data", str(empty)]) == EXIT_BAD_INPUT
    lines = error_lines(capsys)
    assert_no_layout_message(lines, empty, "--data", "the folder is empty")
    assert len(lines) == 2 and "Pass --data" not in "\n".join(lines)


def test_evaluate_and_train_read_the_data_folder_first(empty, tmp_path, capsys):
    assert main(["evaluate", "--model", "nope", "--data", str(empty)]) == EXIT_BAD_INPUT
    assert_no_layout_message(error_lines(capsys), empty, "--data", "the folder is empty")
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--data", str(empty)]) == EXIT_BAD_INPUT
    assert_no_layout_message(error_lines(capsys), empty, "--data", "the folder is empty")
    assert not out.exists()


def test_a_data_folder_from_the_environment_says_how_to_choose_another(empty, monkeypatch, capsys):
    monkeypatch.setenv("CAPTIONING_DATA", str(empty))
    assert main(["data"]) == EXIT_BAD_INPUT
    lines = error_lines(capsys)
    assert_no_layout_message(lines, empty, "$CAPTIONING_DATA", "the folder is empty")
    assert lines[2].strip().startswith("Pass --data DIR or set the CAPTIONING_DATA")


def test_no_data_folder_at_all_says_how_to_give_one(monkeypatch, capsys):
    monkeypatch.delenv("CAPTIONING_DATA", raising=False)
    assert main(["data"]) == EXIT_BAD_INPUT
    (line,) = error_lines(capsys)
    assert line.startswith("error: no data directory given. Pass --data DIR or set")


def test_a_folder_of_other_files_lists_a_few(empty, capsys):
    for name in ("notes.txt", "b.json", "c.csv", "d.txt", "e.txt", "f.txt"):
        (empty / name).write_text("x")
    (empty / "photos").mkdir()
    assert main(["data", "--data", str(empty)]) == EXIT_BAD_INPUT
    found = "found b.json, c.csv, d.txt, e.txt, f.txt and 2 more, which match no layout"
    assert_no_layout_message(error_lines(capsys), empty, "--data", found)


def test_a_data_set_one_folder_down_or_up_is_pointed_at(empty, capsys):
    inner = empty / "flickr8k"
    inner.mkdir()
    (inner / "captions.txt").write_text("image,caption\n")
    assert main(["data", "--data", str(empty)]) == EXIT_BAD_INPUT
    what = "its subfolder flickr8k/ holds a flickr8k-kaggle data set; use that folder"
    assert_no_layout_message(error_lines(capsys), empty, "--data", what)
    images = inner / "Images"
    images.mkdir()
    (images / "1.jpg").write_bytes(b"")
    assert main(["data", "--data", str(images)]) == EXIT_BAD_INPUT
    what = "its parent folder holds a flickr8k-kaggle data set; use that folder"
    assert_no_layout_message(error_lines(capsys), images, "--data", what)


# ---------------------------------------------------------------- a JSON file that is not data


NOT_KARPATHY = [
    (b"{}", "is an empty JSON object"),
    (b"[1, 2]", "holds a JSON array, not an object"),
    (b'"images"', "holds a JSON string, not an object"),
    (b"3", "holds a JSON number, not an object"),
    (b'{"hello": [1]}', 'holds an object with keys hello but no "images" list'),
    (b'{"images": [{"file": "a.jpg"}]}', 'has no "images" entry with "filename" and "sentences"'),
    (b'{"images": [', "is not valid JSON (Expecting value at line 1, column 13)"),
    (b"", "is not valid JSON (the file is empty)"),
    (b'\xff\xfe{"images": []}', "is not UTF-8 text (byte 0xff at offset 0)"),
    (b'{"images": "caf\xe9"}', "is not UTF-8 text (byte 0xe9 at offset 15)"),
]


@pytest.mark.parametrize(
    ("content", "what"), NOT_KARPATHY, ids=[w.split(" (")[0] for _, w in NOT_KARPATHY]
)
def test_a_json_file_that_is_not_a_split_file_says_what_it_holds(content, what, tmp_path, capsys):
    file = tmp_path / "x.json"
    file.write_bytes(content)
    assert main(["data", "--data", str(file)]) == EXIT_BAD_INPUT
    (line,) = error_lines(capsys)
    expected = 'expected a Karpathy split file, {"images": [{"filename", "split", "sentences"}'
    assert line.startswith(f"error: {file} {what}; {expected}")
    assert line.endswith("; see `python -m captioning data --help`")
    assert len(first_line_without(line, file)) < SHORT
    assert file.read_bytes() == content


def test_a_split_file_in_a_folder_that_is_not_json_is_named(tmp_path, capsys):
    (tmp_path / "dataset_flickr8k.json").write_text("{}")
    assert main(["data", "--data", str(tmp_path)]) == EXIT_BAD_INPUT
    (line,) = error_lines(capsys)
    assert line.startswith(f"error: {tmp_path / 'dataset_flickr8k.json'} is an empty JSON object")


def test_coco_captions_outside_their_folder_say_where_they_go(tmp_path, capsys):
    file = tmp_path / "captions.json"
    file.write_text('{"images": [], "annotations": []}')
    assert main(["data", "--data", str(file)]) == EXIT_BAD_INPUT
    (line,) = error_lines(capsys)
    assert line == (
        f"error: {file} holds COCO-style images + annotations, which are read as COCO 2017 "
        "from DIR/annotations/captions_train2017.json and captions_val2017.json (pass DIR)"
    )


def test_a_file_of_no_known_layout_lists_the_layouts(tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("a dog runs\n")
    assert main(["data", "--data", str(file)]) == EXIT_BAD_INPUT
    lines = error_lines(capsys)
    assert lines[0] == f"error: {file} is not a caption file of a known layout"
    assert all(layout in lines[1] for layout in LAYOUTS)


def test_batch_refuses_int8_on_torch_before_starting_ray(tmp_path, capsys):
    from captioning.cli import EXIT_USER_ERROR, main

    argv = ["batch", str(tmp_path), "--model", "resnet50-attention", "--out", str(tmp_path / "out")]
    argv += ["--runtime", "torch"]
    assert main([*argv, "--precision", "int8"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "int8 runs on OpenVINO" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing started, nothing written
