"""Caption metrics: known answers, the nltk/pycocoevalcap cross-check, normalization, METEOR."""

from __future__ import annotations

import math
import os
import stat
import subprocess
import time

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from captioning.models import bleu, coco
from captioning.models.bleu import corpus_bleu_scores, normalize, sentence_bleu_smoothed
from captioning.models.cider import CiderD
from captioning.models.coco import coco_scores, pycoco_bleu
from captioning.models.metrics import (
    DIVERSITY_KEYS,
    METRIC_KEYS,
    METRIC_LABELS,
    diversity_stats,
    evaluate_captions,
    format_table,
)

BLEU = ("bleu1", "bleu2", "bleu3", "bleu4")

# 20 Flickr8k-style images: (hypothesis, five references). Hypotheses are 4+ tokens long, mix
# good, partial and poor captions, and one contains <unk>.
CORPUS = [
    (
        "a black dog runs through a field",
        [
            "A black dog runs across a grassy field.",
            "a black dog is running in the grass",
            "A dog with a black coat running on green grass .",
            "The black dog sprints through the field",
            "a dark dog runs outside on the lawn",
        ],
    ),
    (
        "two kids are swimming in the ocean",
        [
            "Two kids splash in the water at the beach.",
            "two children are playing in a pool",
            "Two young children play in shallow water .",
            "kids playing in the water on a sunny day",
            "A boy and a girl are splashing in the ocean",
        ],
    ),
    (
        "a man is riding a bicycle down a hill",
        [
            "A man rides his bicycle down a dirt path.",
            "a cyclist is riding a bike on a dirt road",
            "A man on a mountain bike rides on a trail",
            "The biker travels down an unpaved road .",
            "a person riding a bicycle through the dirt",
        ],
    ),
    (
        "a woman is climbing up a large rock",
        [
            "A woman wearing a red top climbs a rock wall.",
            "a rock climber in red scales a cliff",
            "A woman in a red shirt is rock climbing .",
            "A climber is hanging onto a large rock",
            "a lady climbs up the side of a mountain",
        ],
    ),
    (
        "a dog is jumping over a wooden fence",
        [
            "A brown dog leaps over a wooden fence.",
            "a dog jumps over the fence in the yard",
            "A tan dog is jumping over an obstacle .",
            "The brown dog jumps a hurdle",
            "a dog in mid air jumping over a barrier",
        ],
    ),
    (
        "a crowd of people walk down the street",
        [
            "A group of people stand on a city street.",
            "several people are standing on the sidewalk",
            "People gather on a busy street corner .",
            "a crowd of people waiting on the street",
            "A group of men and women stand outside a building",
        ],
    ),
    (
        "a girl in a pink dress is on a swing",
        [
            "A little girl sits on a swing at the park.",
            "a small girl is swinging on a swing set",
            "A young girl on a playground swing .",
            "The little girl is sitting on the swing and smiling",
            "a child swings in the park",
        ],
    ),
    (
        "a person is doing a trick on a snowboard",
        [
            "A snowboarder jumps high in the air.",
            "a snowboarder doing a trick in the air",
            "A person on a snowboard is airborne over the snow .",
            "The snowboarder flies through the air above a ramp",
            "a snowboarder jumping off a snowy hill",
        ],
    ),
    (
        "an old man is reading a <unk> on a bench",
        [
            "A man sits on a bench reading a newspaper.",
            "an old man reads the paper on a park bench",
            "A man is sitting on a bench and reading .",
            "a man on a bench with a newspaper",
            "The man is reading while he sits on the bench",
        ],
    ),
    (
        "two dogs are running on the grass",
        [
            "Two dogs play with a red ball in the yard.",
            "two dogs are fighting over a ball",
            "A pair of dogs playing with a tennis ball .",
            "two puppies chase a ball on the grass",
            "Two dogs are playing together outside",
        ],
    ),
    (
        "a child is swimming underwater",
        [
            "A boy swims in a blue swimming pool.",
            "a young boy is swimming underwater in a pool",
            "A child in goggles swims in the pool .",
            "a boy is swimming in the pool",
            "The kid is in the water of a pool",
        ],
    ),
    (
        "a man in a jacket is hiking in the snow",
        [
            "A man in a blue coat walks through the snow.",
            "a person walking in the snow wearing a blue jacket",
            "A man in blue is hiking through deep snow .",
            "a hiker walks across a snowy field",
            "The man in the blue jacket is walking in the snow",
        ],
    ),
    (
        "a cat is lying on a brown sofa",
        [
            "A gray cat sleeps on the sofa.",
            "a cat is lying on a couch",
            "A cat naps on a brown couch .",
            "the cat is sleeping on the couch",
            "a kitten curled up asleep on the sofa",
        ],
    ),
    (
        "a man in a red shirt is playing soccer",
        [
            "A football player runs with the ball.",
            "a player in a red uniform carries the football",
            "A football player is running down the field with the ball .",
            "the running back sprints with the football",
            "a man in a football uniform is running",
        ],
    ),
    (
        "a woman walks on the sand near the ocean",
        [
            "A woman walks along the sandy beach.",
            "a lady is walking on the beach near the water",
            "A woman strolls by the ocean .",
            "a person walking on the beach at sunset",
            "The woman is walking barefoot on the sand",
        ],
    ),
    (
        "a dog is running with a stick",
        [
            "A dog carries a stick in its mouth.",
            "a brown dog with a stick in its mouth",
            "A dog is running with a large stick .",
            "the dog is holding a stick in its mouth",
            "a wet dog carrying a branch out of the water",
        ],
    ),
    (
        "a man with a guitar is singing",
        [
            "A man plays the guitar on a stage.",
            "a musician is playing guitar at a concert",
            "A guitarist performs on stage .",
            "a man with long hair playing an electric guitar",
            "The man is playing a guitar and singing on stage",
        ],
    ),
    (
        "a man and a woman are sitting on a bench",
        [
            "People sit at a table in a restaurant.",
            "a group of friends eating at a restaurant table",
            "Several people are sitting around a table .",
            "diners sitting at tables in a busy restaurant",
            "A family is having dinner at a table",
        ],
    ),
    (
        "a man is skiing down a hill",
        [
            "A skier goes down a snowy slope.",
            "a person skiing down a mountain",
            "A skier is skiing down the snowy hill .",
            "a man on skis going down a steep mountain",
            "The skier races down the snow covered mountain",
        ],
    ),
    (
        "a brown horse runs in a grassy field",
        [
            "A horse runs through a grassy field.",
            "a brown horse is galloping in the field",
            "A horse running across a pasture .",
            "the horse is running in the green field",
            "a white horse runs in an open field",
        ],
    ),
]
HYPS = {f"img{i}": hyp for i, (hyp, _) in enumerate(CORPUS)}
REFS = {f"img{i}": refs for i, (_, refs) in enumerate(CORPUS)}


def bleu_n(precisions: list[float], bp: float = 1.0) -> float:
    """Hand BLEU on the 0-100 scale: BP times the geometric mean of the precisions."""
    return 100.0 * bp * math.prod(precisions) ** (1 / len(precisions))


# -- cross-check against pycocoevalcap ------------------------------------------------------------


def test_corpus_bleu_matches_pycocoevalcap_on_realistic_set():
    ours = corpus_bleu_scores(HYPS, REFS)
    theirs = pycoco_bleu(HYPS, REFS)
    # Same counts and the same "closest reference length" rule (ties to the shorter one) in
    # both. pycocoevalcap adds epsilons, (correct + 1e-15) / (guess + 1e-9) per order and
    # (testlen + 1e-15) / (reflen + 1e-9) for the length ratio, so with every order matched
    # somewhere in the corpus the two agree far below 1e-4 on the 0-1 scale (1e-2 here).
    for k in BLEU:
        assert ours[k] == pytest.approx(theirs[k], abs=1e-2), k
    assert 10.0 < ours["bleu4"] < ours["bleu3"] < ours["bleu2"] < ours["bleu1"] < 100.0


def test_zero_match_order_nltk_zero_pycoco_tiny():
    hyps = {"a": "a dog runs on grass", "b": "the man rides a horse"}
    refs = {"a": ["a dog runs in the grass"], "b": ["a man rides the horse"]}
    ours, theirs = corpus_bleu_scores(hyps, refs), pycoco_bleu(hyps, refs)
    # No 4-gram matches anywhere. Without smoothing nltk puts the smallest float in the log
    # (its "evaluates to 0" warning, silenced here), so BLEU-4 is ~1e-75; pycocoevalcap's
    # 1e-15 numerator epsilon instead gives a tiny but much larger value (~1e-3 on 0-100).
    assert ours["bleu4"] < 1e-50
    assert 1e-6 < theirs["bleu4"] < 0.1
    for k in ("bleu1", "bleu2", "bleu3"):
        assert ours[k] == pytest.approx(theirs[k], abs=1e-2), k


def test_short_hypothesis_nltk_counts_a_phantom_ngram():
    hyps = {"a": "a dog runs on the grass", "b": "a man"}
    refs = {"a": ["a dog runs on the grass"], "b": ["a man rides a horse"]}
    ours, theirs = corpus_bleu_scores(hyps, refs), pycoco_bleu(hyps, refs)
    # nltk's modified precision has denominator max(1, n-gram count), so a hypothesis shorter
    # than n adds 1 to the order-n denominator; pycocoevalcap adds 0. BLEU-1/2 agree, BLEU-3
    # differs: nltk p3 = 4/(4+1), pycoco p3 = 4/4. p1 = 8/8, p2 = 6/6; BP: c = 8, r = 6 + 5.
    bp = math.exp(1 - 11 / 8)
    for k in ("bleu1", "bleu2"):
        assert ours[k] == pytest.approx(theirs[k], abs=1e-2), k
    assert ours["bleu3"] == pytest.approx(bleu_n([8 / 8, 6 / 6, 4 / 5], bp))
    assert theirs["bleu3"] == pytest.approx(bleu_n([8 / 8, 6 / 6, 4 / 4], bp), abs=1e-4)


# -- known answers --------------------------------------------------------------------------------


def test_identical_hypothesis_and_reference_score_100():
    caption = "a black dog is running through the tall grass"
    for scores in (
        corpus_bleu_scores({"x": caption}, {"x": [caption]}),
        sentence_bleu_smoothed(caption, [caption]),
        pycoco_bleu({"x": caption}, {"x": [caption]}),
    ):
        for k in BLEU:
            assert scores[k] == pytest.approx(100.0, abs=1e-6), k


def test_cat_on_the_mat_by_hand():
    hyp, ref = "the cat sat on the mat", "the cat is on the mat"
    scores = corpus_bleu_scores({"x": hyp}, {"x": [ref]})
    # Equal lengths so BP = 1. Clipped matches: unigrams the x2, cat, on, mat = 5/6; bigrams
    # "the cat", "on the", "the mat" = 3/5; trigrams "on the mat" = 1/4; 4-grams 0/3.
    assert scores["bleu1"] == pytest.approx(100 * 5 / 6)
    assert scores["bleu2"] == pytest.approx(bleu_n([5 / 6, 3 / 5]))  # sqrt(1/2)
    assert scores["bleu3"] == pytest.approx(50.0)  # (5/6 * 3/5 * 1/4) ** (1/3) = 1/2
    assert scores["bleu4"] == pytest.approx(0.0, abs=1e-50)


def test_brevity_penalty_uses_closest_reference_length():
    refs = ["a dog runs on the beach"]
    scores = corpus_bleu_scores({"x": "a dog runs"}, {"x": refs})
    # c = 3, r = 6: BP = exp(1 - 6/3); orders 1-3 match perfectly.
    for k in ("bleu1", "bleu2", "bleu3"):
        assert scores[k] == pytest.approx(100 * math.exp(-1)), k
    # With all references, the closest length (4, not 8) sets BP = exp(1 - 4/3).
    refs = ["a dog runs fast", "a brown dog runs along the sandy beach"]
    scores = corpus_bleu_scores({"x": "a dog runs"}, {"x": refs})
    assert scores["bleu1"] == pytest.approx(100 * math.exp(1 - 4 / 3))
    # An exact tie (lengths 2 and 4 around 3) picks the shorter reference: no penalty.
    scores = corpus_bleu_scores({"x": "a dog runs"}, {"x": ["a dog", "a dog runs fast"]})
    assert scores["bleu1"] == pytest.approx(100.0)


def test_corpus_bleu_is_not_the_mean_of_sentence_bleu():
    hyps = {"a": "a dog runs on the grass", "b": "the cat sat on the mat"}
    refs = {"a": ["a dog runs on the grass"], "b": ["the cat is on the mat"]}
    corpus = corpus_bleu_scores(hyps, refs)
    # Pooled counts (identical pair + cat/mat pair): p1 = (6+5)/12, p2 = (5+3)/10,
    # p3 = (4+1)/8, p4 = (3+0)/6; c = r = 12 so BP = 1.
    p = [11 / 12, 8 / 10, 5 / 8, 3 / 6]
    for n, k in enumerate(BLEU, start=1):
        assert corpus[k] == pytest.approx(bleu_n(p[:n])), k
    per_image = [corpus_bleu_scores({i: hyps[i]}, {i: refs[i]}) for i in hyps]
    mean = {k: sum(s[k] for s in per_image) / 2 for k in BLEU}
    assert mean["bleu3"] == pytest.approx(75.0)  # (100 + 50) / 2, vs corpus 77.1
    assert mean["bleu4"] == pytest.approx(50.0)  # (100 + 0) / 2, vs corpus 69.2
    for k in ("bleu2", "bleu3", "bleu4"):
        assert abs(corpus[k] - mean[k]) > 0.1, k


def test_sentence_bleu_is_smoothed_where_corpus_bleu_is_zero():
    hyp, ref = "the cat sat on the mat", "the cat is on the mat"
    smoothed = sentence_bleu_smoothed(hyp, [ref])
    assert corpus_bleu_scores({"x": hyp}, {"x": [ref]})["bleu4"] == pytest.approx(0, abs=1e-50)
    # method1: the zero 4-gram count becomes epsilon 0.1, so p4 = 0.1/3.
    assert smoothed["bleu4"] == pytest.approx(bleu_n([5 / 6, 3 / 5, 1 / 4, 0.1 / 3]))
    assert smoothed["bleu4"] > 20.0
    assert smoothed["bleu1"] == pytest.approx(100 * 5 / 6)


# -- normalization --------------------------------------------------------------------------------


def test_special_tokens_case_and_punctuation_are_ignored():
    forms = [
        "<start> A Dog, running! <end> <pad>",
        ["a", "dog", "running"],
        ["<start>", "A", "dog", "running", "<end>", "<pad>", "<pad>"],
        "a dog running",
    ]
    assert all(normalize(f) == ["a", "dog", "running"] for f in forms)
    refs = {"x": ["A dog is running.", "The dog runs!"]}
    results = [corpus_bleu_scores({"x": f}, refs) for f in forms]
    assert all(r == results[0] for r in results)
    smoothed = [sentence_bleu_smoothed(f, refs["x"]) for f in forms]
    assert all(s == smoothed[0] for s in smoothed)
    shouty = {"x": ["<start> A DOG IS RUNNING <end>", "the dog, runs"]}
    assert corpus_bleu_scores({"x": forms[0]}, shouty) == results[0]


def test_unk_is_kept_and_never_matches():
    assert normalize("a <unk> dog") == ["a", "<unk>", "dog"]
    assert normalize(["a", "<unk>", "dog"]) == ["a", "<unk>", "dog"]
    assert normalize("a <unk> dog", keep_unk=False) == ["a", "unk", "dog"]
    # Even a reference containing "unk" or "<unk>" does not match a predicted <unk>.
    for ref in ("a dog unk", "a dog <unk>"):
        scores = corpus_bleu_scores({"x": "a dog <unk>"}, {"x": [ref]})
        assert scores["bleu1"] == pytest.approx(100 * 2 / 3), ref


def test_empty_hypothesis_does_not_crash():
    assert corpus_bleu_scores({"x": "<start> <end>"}, {"x": ["a dog"]}) == dict.fromkeys(BLEU, 0)
    assert sentence_bleu_smoothed([], ["a dog"]) == dict.fromkeys(BLEU, 0)
    hyps = {**HYPS, "img0": ""}
    assert corpus_bleu_scores(hyps, REFS)["bleu1"] > 0
    coco = coco_scores(hyps, REFS, meteor=False)
    assert coco["cider"] > 0 and coco["rougeL"] > 0


# -- validation -----------------------------------------------------------------------------------


def test_hypotheses_without_references_raise():
    with pytest.raises(ValueError, match="have no references: 'nope'"):
        corpus_bleu_scores({**HYPS, "nope": "a dog"}, REFS)
    with pytest.raises(ValueError, match="no references"):
        evaluate_captions({"nope": "a dog"}, REFS, meteor=False)
    with pytest.raises(ValueError, match="no references"):
        coco_scores({"nope": "a dog"}, REFS, meteor=False)
    with pytest.raises(ValueError, match="no hypotheses"):
        corpus_bleu_scores({}, REFS)
    with pytest.raises(ValueError, match="empty list of references"):
        corpus_bleu_scores({"x": "a dog"}, {"x": []})
    with pytest.raises(TypeError, match="list of captions"):
        corpus_bleu_scores({"x": "a dog"}, {"x": "a dog"})


def test_extra_reference_ids_are_ignored():
    subset = {k: HYPS[k] for k in ("img0", "img1", "img2")}
    only = {k: REFS[k] for k in subset}
    assert corpus_bleu_scores(subset, REFS) == corpus_bleu_scores(subset, only)


# -- CIDEr-D, ROUGE-L, METEOR ---------------------------------------------------------------------


def test_cider_and_rouge_known_answers():
    perfect = {k: refs[0] for k, refs in REFS.items()}
    unrelated = {k: "purple elephants juggle quantum violins" for k in REFS}
    good = coco_scores(perfect, REFS, meteor=False)
    bad = coco_scores(unrelated, REFS, meteor=False)
    assert good["cider"] > 100.0 > 1.0 > bad["cider"] >= 0.0
    assert bad["rougeL"] == 0.0
    # One reference per image, hypothesis identical to it: every tf-idf cosine is 1, so
    # CIDEr-D is coco's maximum 10.0, i.e. 1000 on our scale; ROUGE-L is 100.
    single = {k: [refs[0]] for k, refs in REFS.items()}
    same = coco_scores(perfect, single, meteor=False)
    assert same["cider"] == pytest.approx(1000.0, rel=1e-6)
    assert same["rougeL"] == pytest.approx(100.0)
    assert good["meteor"] is None and "meteor=False" in good["meteor_error"]


@pytest.mark.slow
@pytest.mark.skipif(coco._java_executable() is None, reason="java is not installed")
def test_meteor_with_java(monkeypatch):
    pids: list[int] = []

    class Recording(coco._MeteorProcess):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pids.append(self.meteor_p.pid)

    monkeypatch.setattr(coco, "_MeteorProcess", Recording)
    single = {k: [refs[0]] for k, refs in REFS.items()}
    perfect = {k: refs[0] for k, refs in REFS.items()}
    same = coco_scores(perfect, single)
    assert same["meteor_error"] is None
    assert 95.0 < same["meteor"] <= 100.0  # only the fragmentation penalty remains
    scores = evaluate_captions(HYPS, REFS)
    assert "meteor_error" not in scores
    assert scores["n_images"] == len(HYPS)
    assert 20.0 < scores["meteor"] < 70.0
    assert scores["meteor"] < same["meteor"]
    assert set(scores) == {*METRIC_KEYS, "n_images"}
    # Each call started one JVM and killed and reaped it: no process, not even a zombie, left.
    assert len(pids) == 2
    children = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(os.getpid())], capture_output=True, text=True
    ).stdout.split()
    for pid in pids:
        assert str(pid) not in children
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_meteor_without_java_gives_reason(monkeypatch):
    monkeypatch.setattr(coco.shutil, "which", lambda name: None)
    scores = coco_scores(HYPS, REFS)
    assert scores["meteor"] is None
    assert "java not found" in scores["meteor_error"]
    assert scores["cider"] > 0
    full = evaluate_captions(HYPS, REFS)
    assert full["meteor"] is None and "java not found" in full["meteor_error"]


def test_meteor_failure_is_reported_and_process_reaped(monkeypatch, tmp_path):
    started: list[coco._MeteorProcess] = []

    class Recording(coco._MeteorProcess):
        def __init__(self, *args, **kwargs):
            started.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(coco, "_MeteorProcess", Recording)
    # A "java" that exits at once: METEOR reads EOF and fails with a reason.
    failing = tmp_path / "java-fails"
    failing.write_text("#!/bin/sh\necho 'no JVM here' >&2\nexit 1\n")
    failing.chmod(failing.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(coco, "_java_executable", lambda: str(failing))
    scores = coco_scores(HYPS, REFS)
    assert scores["meteor"] is None
    assert "METEOR failed" in scores["meteor_error"]
    assert "no JVM here" in scores["meteor_error"]
    # A "java" that hangs: the watchdog kills it instead of blocking forever.
    hanging = tmp_path / "java-hangs"
    hanging.write_text("#!/bin/sh\nexec sleep 60\n")
    hanging.chmod(hanging.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(coco, "_java_executable", lambda: str(hanging))
    start = time.monotonic()
    scores = coco_scores(HYPS, REFS, meteor_timeout_s=1.0)
    assert time.monotonic() - start < 10.0
    assert scores["meteor"] is None and "timed out" in scores["meteor_error"]
    assert len(started) == 2
    assert all(p.meteor_p is None for p in started)  # closed: killed and reaped


# -- table ----------------------------------------------------------------------------------------


def test_format_table():
    table = format_table(
        {
            "resnet50 greedy": {
                "bleu1": 60.04,
                "bleu2": 41.0,
                "bleu3": 27.56,
                "bleu4": 18.0,
                "meteor": 19.96,
                "rougeL": 45.0,
                "cider": 48.24,
                "distinct": 85.25,
                "repeat_trigram": 0.5,
                "repeat_bigram": 3.0,
            },
            "vgg16 beam=3": {"bleu1": 58.0, "bleu4": 16.5, "meteor": None},
        }
    )
    lines = table.splitlines()
    header = lines[0]
    for label in ("Model", *METRIC_LABELS.values()):
        assert label in header, label
    assert header.index("CIDEr-D") < header.index("Distinct %") < header.index("Rep. bigram %")
    assert lines[2].split() == ["resnet50", "greedy", "60.0", "41.0", "27.6", "18.0", "20.0"] + [
        "45.0",
        "48.2",
        "85.2",
        "0.5",
        "3.0",
    ]
    assert lines[3].split() == ["vgg16", "beam=3", "58.0", "—", "—", "16.5"] + ["—"] * 6
    assert len({len(line) for line in lines[:3]}) == 1  # aligned columns


# -- diversity ------------------------------------------------------------------------------------


def test_diversity_known_answers():
    hyps = [
        "a dog runs on the grass",
        "A dog runs on the grass.",  # the same caption after normalization
        "a man in a red shirt and a man in a red shirt",  # repeats trigrams (and bigrams)
        "a dog and a cat",  # repeats only the unigram "a": no repeated bigram
        "a man and a man",  # repeats the bigram "a man", no trigram
    ]
    stats = diversity_stats(hyps)
    assert set(stats) == set(DIVERSITY_KEYS)
    assert stats["distinct"] == pytest.approx(100 * 4 / 5)
    assert stats["repeat_trigram"] == pytest.approx(100 * 1 / 5)
    assert stats["repeat_bigram"] == pytest.approx(100 * 2 / 5)
    assert diversity_stats({"x": "a b", "y": "c d"}) == {
        "distinct": 100.0,
        "repeat_trigram": 0.0,
        "repeat_bigram": 0.0,
    }
    with pytest.raises(ValueError, match="no captions"):
        diversity_stats([])
    with pytest.raises(TypeError, match="single string"):
        diversity_stats("a dog")


def test_evaluate_captions_reports_diversity():
    hyps = {**HYPS, "img1": HYPS["img0"], "img2": "a dog and a dog and a dog"}
    scores = evaluate_captions(hyps, REFS, meteor=False)
    assert set(scores) == {*METRIC_KEYS, "n_images", "meteor_error"}
    assert scores["distinct"] == pytest.approx(100 * 19 / 20)
    assert scores["repeat_trigram"] == pytest.approx(100 * 1 / 20)
    assert scores["repeat_bigram"] == pytest.approx(100 * 1 / 20)


# -- CIDEr-D reward -------------------------------------------------------------------------------

# Edge cases next to the realistic corpus: an empty and a one-word hypothesis, unknown words and
# <unk>, repeated n-grams (clipping), one reference, duplicate references, a long reference.
EDGE_HYPS = {
    "e0": "",
    "e1": "dog",
    "e2": "a zebra juggles a <unk> near a <unk>",
    "e3": "a dog a dog a dog a dog runs",
    "e4": "the man rides a horse",
    "e5": "a girl in a pink dress is jumping on a trampoline in the back yard of a house",
}
EDGE_REFS = {
    "e0": ["a dog runs", "the dog is running"],
    "e1": ["a dog", "a dog", "dog"],
    "e2": ["a zebra stands in a field"],
    "e3": ["a dog runs", "a dog runs fast", "two dogs run"],
    "e4": ["a man rides a horse", "a man on a horse", "a person riding a brown horse"],
    "e5": ["a girl jumps on a trampoline", "a little girl in a pink dress on a trampoline"],
}
FIXED_HYPS = {**HYPS, **EDGE_HYPS}
FIXED_REFS = {**REFS, **EDGE_REFS}


def pycoco_cider(hyps, refs):
    """pycocoevalcap's Cider on our normalized tokens: (mean, per-caption scores)."""
    gts, res = bleu.prepare(hyps, refs).coco_inputs()
    mean, per = Cider().compute_score(gts, res)
    return float(mean), np.asarray(per)


def test_cider_d_matches_pycocoevalcap():
    mean, per = pycoco_cider(FIXED_HYPS, FIXED_REFS)
    scorer = CiderD(FIXED_REFS)  # the evaluated set's references, as Cider() uses
    ours = scorer.score(list(FIXED_HYPS.values()), list(FIXED_HYPS))
    assert ours.shape == (len(FIXED_HYPS),)
    np.testing.assert_allclose(ours, per, rtol=0, atol=1e-6)
    assert float(ours.mean()) == pytest.approx(mean, abs=1e-6)
    assert coco_scores(FIXED_HYPS, FIXED_REFS, meteor=False)["cider"] == pytest.approx(100 * mean)
    # the cases really are edge cases: zero for the empty caption, clipping keeps e3 low
    assert ours[len(HYPS)] == 0.0 and 0 < ours[len(HYPS) + 3] < ours[len(HYPS) + 4]
    # token lists give the same scores; a caption list scores each against its own image
    tokens = [normalize(h) for h in FIXED_HYPS.values()]
    np.testing.assert_allclose(scorer.score(tokens, list(FIXED_HYPS)), ours, atol=1e-12)
    assert scorer.score([HYPS["img3"]] * 2, ["img3", "img4"])[0] == pytest.approx(per[3])


def test_cider_d_uses_the_corpus_document_frequencies():
    # pycocoevalcap's per-image score depends on the whole set only through df and N, so
    # scoring a subset with CiderD built on the full references must give the full run's scores.
    _, per = pycoco_cider(FIXED_HYPS, FIXED_REFS)
    scorer = CiderD(FIXED_REFS)
    ids = ["e4", "img7", "img2", "e2"]
    pos = [list(FIXED_HYPS).index(i) for i in ids]
    subset = scorer.score([FIXED_HYPS[i] for i in ids], ids)
    np.testing.assert_allclose(subset, per[pos], atol=1e-6)
    _, alone = pycoco_cider({i: FIXED_HYPS[i] for i in ids}, FIXED_REFS)
    assert np.abs(alone - subset).max() > 0.01  # the subset's own df would differ


def test_cider_d_end_word_equals_pycocoevalcap_with_a_last_word():
    # end_word=True is CIDEr-D on captions with one more last word, on both sides
    def ended(caption):
        return [*normalize(caption), "zzend"]

    hyps = {k: ended(v) for k, v in FIXED_HYPS.items()}
    refs = {k: [ended(r) for r in v] for k, v in FIXED_REFS.items()}
    _, per = pycoco_cider(hyps, refs)
    scorer = CiderD(FIXED_REFS, end_word=True)
    ours = scorer.score(list(FIXED_HYPS.values()), list(FIXED_HYPS))
    np.testing.assert_allclose(ours, per, rtol=0, atol=1e-6)
    plain = CiderD(FIXED_REFS).score(list(FIXED_HYPS.values()), list(FIXED_HYPS))
    assert np.abs(ours - plain).max() > 0.01  # the end word changes the scores


def test_cider_d_end_word_penalises_a_caption_cut_off_mid_phrase():
    refs = {
        "a": ["a dog runs on the grass", "a brown dog runs on green grass", "a dog on the grass"],
        "b": ["a man rides a red bike", "a man on a red bike", "a cyclist rides a bike"],
    }
    whole, cut = "a dog runs on the grass", "a dog runs on the"
    for end_word in (False, True):
        scores = CiderD(refs, end_word=end_word).score([whole, cut], ["a", "a"])
        assert scores[0] > scores[1]
    plain = CiderD(refs).score([whole, cut], ["a", "a"])
    ended = CiderD(refs, end_word=True).score([whole, cut], ["a", "a"])
    assert ended[1] / ended[0] < plain[1] / plain[0]  # the cut caption loses more


def test_cider_d_on_vocabulary_ids():
    from captioning.data.vocab import END_ID, PAD_ID, START_ID, Vocabulary

    vocab = Vocabulary.build([c for refs in FIXED_REFS.values() for c in refs], min_freq=2)
    ids = list(FIXED_HYPS)
    rows = [vocab.encode(FIXED_HYPS[i], add_special=False) for i in ids]  # rare words -> <unk>
    longest = max(len(r) for r in rows) + 2
    mat = np.full((len(rows), longest), PAD_ID)
    for k, r in enumerate(rows):
        mat[k, : len(r) + 1] = [*r, END_ID]
        mat[k, len(r) + 1 :] = [START_ID] * (longest - len(r) - 1)  # ignored after <end>
    scorer = CiderD(FIXED_REFS)
    ours = scorer.score_ids(mat, ids, scorer.word_table(vocab.itos))
    texts = {i: vocab.decode(r) for i, r in zip(ids, rows, strict=True)}
    assert any("<unk>" in t for t in texts.values())
    _, per = pycoco_cider(texts, FIXED_REFS)
    np.testing.assert_allclose(ours, per, atol=1e-6)


def test_cider_d_known_answers_and_errors():
    refs = {"a": ["a black dog runs"], "b": ["two men play chess"], "c": ["a red car"]}
    scorer = CiderD(refs)
    assert len(scorer) == 3
    # identical to the single reference: every cosine is 1 and the length penalty is 1
    np.testing.assert_allclose(scorer.score(["a black dog runs"], ["a"]), [10.0])
    assert scorer.score(["two men play chess"], ["a"])[0] == 0.0
    with pytest.raises(ValueError, match="not among"):
        scorer.score(["a dog"], ["zzz"])
    with pytest.raises(ValueError, match="2 captions but 1"):
        scorer.score(["a dog", "a cat"], ["a"])
    with pytest.raises(TypeError, match="single string"):
        scorer.score("a dog", ["a"])
    with pytest.raises(ValueError, match="at least one image"):
        CiderD({})


def test_cider_d_is_fast():
    # 16 images x 5 samples, against 200 images' references; generous bound (loaded machines)
    scorer = CiderD({f"i{k}": refs for k, (_, refs) in enumerate(CORPUS * 10)})
    caps = [hyp for hyp, _ in CORPUS[:16] for _ in range(5)]
    ids = [f"i{k}" for k in range(16) for _ in range(5)]
    times = []
    for _ in range(10):
        start = time.perf_counter()
        scorer.score(caps, ids)
        times.append(time.perf_counter() - start)
    assert min(times) < 0.1  # ~2 ms on a loaded machine; pycocoevalcap's Cider takes ~100x longer


def test_cider_d_matches_pycocoevalcap_on_flickr8k(flickr8k_dir):
    from captioning.data import load_dataset

    ds = load_dataset(flickr8k_dir)
    names = ds.splits["test"][:300]
    # each image's first caption against its other four, and a caption of the next image
    hyps = {n: ds.captions[n][0] for n in names}
    hyps.update(
        {f"{n}/other": ds.captions[m][0] for n, m in zip(names, names[1:] + names[:1], strict=True)}
    )
    refs = {k: ds.captions[k.split("/")[0]][1:] for k in hyps}
    mean, per = pycoco_cider(hyps, refs)
    ours = CiderD(refs).score(list(hyps.values()), list(hyps))
    np.testing.assert_allclose(ours, per, rtol=0, atol=1e-6)
    assert float(ours.mean()) == pytest.approx(mean, abs=1e-6)


def test_per_image_cider_averages_to_the_corpus_cider():
    from captioning.inference.evaluate import image_cider

    refs = {
        "a": ["a dog runs on the grass", "a brown dog is running", "the dog runs outside"],
        "b": ["two children play in the water", "kids splash in a pool", "children swim"],
        "c": ["a man rides a bike on a dirt road", "a cyclist on a trail", "a man on a bicycle"],
    }
    hyps = {"a": "a dog is running on the grass", "b": "a man is swimming"}
    hyps["c"] = "a man rides a bike"
    per = image_cider(hyps, refs)
    corpus = evaluate_captions(hyps, refs, meteor=False)["cider"]
    assert sum(per.values()) / len(per) == pytest.approx(corpus, abs=1e-6)
    assert per["c"] > per["b"]  # the good caption scores above the wrong one
