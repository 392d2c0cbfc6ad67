"""Model soups: the weighted mean of bundles' weights, written as a bundle of its own."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from captioning import Captioner
from captioning.bundle.card import card_markdown
from captioning.bundle.catalog import list_bundles
from captioning.bundle.format import BundleError
from captioning.bundle.records import read_records
from captioning.bundle.soup import greedy_soup, make_soup, member_histories
from captioning.cli import main as cli_main
from captioning.core.files import sha256_file
from captioning.training.train import main as train_main
from dashboard import tables
from tests.synthetic import make_tiny_flickr
from tests.test_train import config


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two tiny attention bundles of one configuration, trained with different seeds."""
    root = tmp_path_factory.mktemp("soup")
    data = make_tiny_flickr(root / "flickr")
    for seed in (0, 1):
        cfg = config(epochs=1, seed=seed, lr=1e-2)
        train_main(cfg, str(data), root / f"m{seed}", root / "cache", resume=False)
    return {"data": data, "a": root / "m0", "b": root / "m1"}


def test_a_soup_is_the_weighted_mean_and_captions(members, tmp_path):
    a, b, out = members["a"], members["b"], tmp_path / "soup"
    cfg = make_soup(out, [str(a), str(b)], [3, 1])
    wa, wb = load_file(a / "decoder.safetensors"), load_file(b / "decoder.safetensors")
    ws = load_file(out / "decoder.safetensors")
    assert set(ws) == set(wa)
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # the members really differ
    for k, v in ws.items():
        assert v.dtype == wa[k].dtype == torch.float16
        want = 0.75 * wa[k].double() + 0.25 * wb[k].double()
        torch.testing.assert_close(v.double(), want, atol=2e-3, rtol=2e-3)
    assert [m["weight"] for m in cfg["soup"]["members"]] == [0.75, 0.25]
    assert cfg["soup"]["members"][1]["sha256"] == {
        "decoder.safetensors": sha256_file(b / "decoder.safetensors")
    }
    on_disk = json.loads((out / "config.json").read_text())
    assert on_disk == cfg and cfg["name"] == "soup" and cfg["decoder_config"]["kind"] == "attention"
    assert read_records(out) == []
    history = json.loads((out / "history.json").read_text())  # the members' epochs, tagged
    for m in (a, b):
        own = json.loads((m / "history.json").read_text())
        assert own and [r for r in history if r["member"] == m.name] == [
            {**r, "member": m.name} for r in own
        ]
    rows = tables.read_history(list_bundles(tmp_path))  # the Training page: a line per member
    assert set(rows["model"]) == {"soup · m0", "soup · m1"}
    card = card_markdown(out)  # names its members instead of a best epoch
    assert "weight-averaged soup of `m0` (0.75), `m1` (0.25)" in card and "Best epoch" not in card
    photo = members["data"] / "Images" / "0000_synthetic.png"
    res = Captioner.load(out, precision="fp32", runtime="torch").caption(photo, beam_size=2)
    assert res.text and res.attention is not None


def test_a_soup_of_copies_is_the_model_itself(members, tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(members["a"], twin)
    make_soup(tmp_path / "same", [str(members["a"]), str(twin)])
    want, got = (
        load_file(members["a"] / "decoder.safetensors"),
        load_file(tmp_path / "same" / "decoder.safetensors"),
    )
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_soup_refuses_what_is_not_one_model(members, tmp_path):
    a = str(members["a"])
    other = tmp_path / "wider"
    shutil.copytree(members["a"], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["decoder_config"]["hidden_dim"] *= 2
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="differ in decoder_config"):
        make_soup(tmp_path / "s1", [a, str(other)])
    words = tmp_path / "words"
    shutil.copytree(members["a"], words)
    vocab = json.loads((words / "vocab.json").read_text())
    vocab["itos"] = vocab["itos"][:-1] + ["zebra"]
    (words / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(BundleError, match="different vocabularies"):
        make_soup(tmp_path / "s2", [a, str(words)])
    with pytest.raises(BundleError, match="at least two"):
        make_soup(tmp_path / "s3", [a])
    with pytest.raises(BundleError, match="one weight > 0"):
        make_soup(tmp_path / "s4", [a, str(members["b"])], [1, 0])
    with pytest.raises(BundleError, match="different member bundles"):
        make_soup(tmp_path / "s5", [a, a])
    with pytest.raises(BundleError, match="is one of the members"):
        make_soup(members["a"], [a, str(members["b"])])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="not empty"):
        make_soup(busy, [a, str(members["b"])])
    assert (busy / "notes.txt").read_text() == "mine"  # nothing of it was touched


def test_the_cli_makes_a_soup(members, tmp_path, capsys):
    out = tmp_path / "cli-soup"
    assert cli_main(["soup", str(members["a"]), str(members["b"]), "--out", str(out)]) == 0
    assert "tune-decoding" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert [m["weight"] for m in cfg["soup"]["members"]] == [0.5, 0.5]


def _closeness_to(target):
    """A score that is higher the nearer a bundle's decoder weights are to ``target``'s."""
    want = load_file(target / "decoder.safetensors")

    def score(path):
        got = load_file(path / "decoder.safetensors")
        return -sum(float((got[k].double() - want[k].double()).abs().sum()) for k in want)

    return score


def test_a_greedy_soup_keeps_only_members_that_help(members, tmp_path):
    a, b = members["a"], members["b"]
    twin = tmp_path / "twin"
    shutil.copytree(a, twin)
    scored, discarded = [], []
    close_to_a = _closeness_to(a)

    def score(path):
        scored.append(path.name)
        return close_to_a(path)

    out = tmp_path / "greedy"
    cfg, trials = greedy_soup(
        out, [str(b), str(twin), str(a)], score, label="closeness", discard=discarded.append
    )
    # alone: twin and a tie at 0 (twin first, as given), b is worse; twin + a is a itself
    # (kept, 0 >= 0); adding b pulls the soup away from a (left out)
    assert [(t["member"], t["kept"]) for t in trials] == [
        ("twin", True),
        ("m0", True),
        ("m1", False),
    ]
    assert scored == ["m1", "twin", "m0", ".greedy.greedy", ".greedy.greedy"]
    assert [p.name for p in discarded] == [".greedy.greedy"] * 2
    assert not (tmp_path / ".greedy.greedy").exists()  # the candidates are gone
    assert [m["name"] for m in cfg["soup"]["members"]] == ["twin", "m0"]
    assert cfg["soup"]["greedy"] == {"score": "closeness", "trials": trials}
    assert json.loads((out / "config.json").read_text()) == cfg
    want, got = load_file(a / "decoder.safetensors"), load_file(out / "decoder.safetensors")
    assert all(torch.equal(want[k], got[k]) for k in want)
    # when nothing helps the best member, nothing is written
    none_cfg, trials = greedy_soup(tmp_path / "none", [str(a), str(b)], close_to_a)
    assert none_cfg is None and [t["kept"] for t in trials] == [True, False]
    assert not (tmp_path / "none").exists()


def test_the_cli_greedy_soup_scores_on_dev(members, tmp_path, capsys):
    a, b, out = str(members["a"]), str(members["b"]), tmp_path / "greedy-cli"
    common = ["--data", str(members["data"]), "--cache", str(tmp_path / "cache")]
    args = ["soup", a, b, "--out", str(out), "--greedy", "--beam", "2", "--precision", "fp32"]
    assert cli_main(args + common) == 0
    text = capsys.readouterr().out
    assert "greedy soup by dev CIDEr-D, beam 2 α 0" in text
    assert "m0" in text and "m1" in text
    if out.exists():  # the soup beat its best member on dev
        trials = json.loads((out / "config.json").read_text())["soup"]["greedy"]["trials"]
        assert [t["kept"] for t in trials] == [True, True]
        assert trials[1]["soup"] >= trials[0]["alone"]
    else:
        assert "nothing written" in text
    assert not (tmp_path / ".greedy-cli.greedy").exists()
    # the scoring flags mean nothing without --greedy
    assert cli_main(["soup", a, b, "--out", str(tmp_path / "x"), "--beam", "2"]) != 0
    assert "only with --greedy" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_soup_of_a_soup_counts_as_its_members(members, tmp_path):
    a, b = members["a"], members["b"]
    twin = tmp_path / "twin"
    shutil.copytree(a, twin)
    inner = tmp_path / "inner"
    make_soup(inner, [str(a), str(b)])
    make_soup(tmp_path / "outer", [str(inner), str(twin)], [2, 1])
    make_soup(tmp_path / "flat", [str(a), str(b), str(twin)])
    outer = load_file(tmp_path / "outer" / "decoder.safetensors")
    flat = load_file(tmp_path / "flat" / "decoder.safetensors")
    for k, v in flat.items():  # (a + b) / 2 weighted 2:1 with twin = (a + b + twin) / 3
        torch.testing.assert_close(outer[k].double(), v.double(), atol=2e-3, rtol=2e-3)
    history = json.loads((tmp_path / "outer" / "history.json").read_text())
    assert {r["member"] for r in history} == {"m0", "m1", "twin"}  # the original runs' lines
    # a member that continued another (as SCST continues its --init) repeats its epochs: once
    cont = tmp_path / "cont"
    shutil.copytree(a, cont)
    inner_rows = json.loads((inner / "history.json").read_text())
    (cont / "history.json").write_text(json.dumps([*inner_rows, {"epoch": 9, "stage": "scst"}]))
    assert member_histories([inner, cont]) == [*inner_rows, {"epoch": 9, "stage": "scst",
                                                             "member": "cont"}]  # fmt: skip
