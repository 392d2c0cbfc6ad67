"""Self-critical sequence training: it fixes a decoder's bad habit on the synthetic task; the
baselines, the masking after <end>, the reward (exact CIDEr-D) and the end-to-end stage."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from pycocoevalcap.cider.cider import Cider
from safetensors.torch import load_file

from captioning.data.vocab import END_ID, PAD_ID, START_ID, Vocabulary, pad_batch
from captioning.models.bleu import normalize
from captioning.models.cider import CiderD
from captioning.models.decoders import DecoderConfig, build_decoder, caption_loss
from captioning.models.decoding import DecodeConfig, NextWordRules, greedy_decode
from captioning.training.run import check_settings
from captioning.training.scst import (
    SCST_RESUME_FREE,
    CiderReward,
    ScstConfig,
    _dev_decoding,
    main_scst,
    mean_of_others,
    sample_captions,
    scst_step,
    self_critical_loss,
)
from tests.synthetic import TEMPLATES, TinyEncoder, make_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread


def references(caption: str) -> list[str]:
    """The five template captions of a picture, from its "a c1 s1 above a c2 s2" caption."""
    w = caption.split()
    return [t.format(w[1], w[2], w[5], w[6]) for t in TEMPLATES]


def rambling(caption: str) -> str:
    """The habit to unlearn: the lower shape repeated twice more after the caption."""
    w = caption.split()
    return f"{caption} and a {w[5]} {w[6]} and a {w[5]} {w[6]}"


@pytest.fixture(scope="module")
def task():
    """A merge decoder trained (cross-entropy) on rambling captions of 200 pictures."""
    train, test = make_task(200, 40, seed=1)
    enc = TinyEncoder()
    train_refs = {f"tr{i}": references(c) for i, (_, c) in enumerate(train)}
    test_refs = {f"te{i}": references(c) for i, (_, c) in enumerate(test)}
    texts = [r for refs in train_refs.values() for r in refs] + [rambling(c) for _, c in train]
    vocab = Vocabulary.build(texts, min_freq=1)
    train_feats, _ = enc([im for im, _ in train])  # pooled [200, 256]
    test_feats, _ = enc([im for im, _ in test])
    torch.manual_seed(0)
    cfg = DecoderConfig(
        kind="merge",
        vocab_size=len(vocab),
        feat_dim=train_feats.shape[-1],
        embed_dim=32,
        hidden_dim=64,
        merge_dim=64,
        dropout=0.1,
    )
    model = build_decoder(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seqs = [vocab.encode(rambling(c)) for _, c in train]
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        idx = torch.randint(0, len(seqs), (32,), generator=g)
        tokens, _ = pad_batch([seqs[i] for i in idx.tolist()])
        logits, _ = model(model.context(train_feats[idx]), tokens)
        loss, _ = caption_loss(logits, tokens, None, 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {
        "vocab": vocab,
        "model": model.eval(),
        "train": (train_feats, list(train_refs)),
        "train_refs": train_refs,
        "test": (test_feats, test_refs),
        "reward": CiderReward(train_refs, vocab),
    }


def held_out(model, task) -> tuple[float, float]:
    """Greedy captions of the held-out pictures: mean CIDEr-D (coco scale) and mean words."""
    feats, refs = task["test"]
    was = model.training
    hyps = [h.tokens for h in greedy_decode(model.eval(), feats)]
    model.train(was)
    texts = [task["vocab"].decode(h) for h in hyps]
    return float(CiderD(refs).score(texts, list(refs)).mean()), float(
        np.mean([len(h) for h in hyps])
    )


def run_scst(task, cfg: ScstConfig, steps: int, seed: int = 0):
    """``steps`` SCST updates on copies of the task's decoder; (model, rewards per step)."""
    model = copy.deepcopy(task["model"]).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    feats, names = task["train"]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    rewards = []
    for _ in range(steps):
        idx = torch.randint(0, len(names), (cfg.batch_images,), generator=g).tolist()
        loss, stats = scst_step(model, feats[idx], [names[i] for i in idx], task["reward"], cfg)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        rewards.append(stats["reward"])
    return model, rewards


def test_scst_unlearns_rambling_and_raises_held_out_cider(task):
    before, words_before = held_out(task["model"], task)
    assert before < 1.0  # the rambling tail costs CIDEr-D's length penalty and clipping
    assert words_before > 14  # "a red circle above a blue square and a blue square and ..."
    cfg = ScstConfig(batch_images=16, samples=5, max_len=20, lr=1e-3)
    model, rewards = run_scst(task, cfg, steps=20)
    after, words_after = held_out(model, task)
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.5
    assert after > before + 1.5, (before, after)
    assert words_after < 10  # the references have 7-9 words


def test_greedy_baseline_is_the_greedy_captions_reward(task):
    cfg = ScstConfig(batch_images=8, samples=3, baseline="greedy", max_len=20)
    feats, names = task["train"]
    model = copy.deepcopy(task["model"]).train()
    loss, stats = scst_step(model, feats[:8], names[:8], task["reward"], cfg)
    assert model.training  # restored after decoding the baseline in eval mode
    hyps = greedy_decode(model.eval(), feats[:8], DecodeConfig(beam_size=1, max_len=20))
    texts = [task["vocab"].decode(h.tokens) for h in hyps]
    exact = CiderD(task["train_refs"], end_word=True).score(texts, names[:8])  # the reward's
    assert stats["greedy_reward"] == pytest.approx(float(exact.mean()), abs=1e-6)
    assert torch.isfinite(loss) and loss.requires_grad
    # and the greedy baseline also teaches the decoder to stop
    trained, _ = run_scst(
        task,
        ScstConfig(batch_images=16, samples=3, baseline="greedy", lr=1e-3, max_len=20),
        steps=10,
    )
    assert held_out(trained, task)[0] > held_out(task["model"], task)[0] + 1.0


def test_mean_of_others_baseline():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 4.0]])
    b = mean_of_others(r)
    torch.testing.assert_close(
        b, torch.tensor([[11 / 3, 10 / 3, 3.0, 2.0], [4 / 3, 4 / 3, 4 / 3, 0]])
    )
    torch.testing.assert_close((r - b).sum(1), torch.zeros(2))  # advantages cancel per image
    with pytest.raises(ValueError, match="samples must be >= 2"):
        ScstConfig(samples=1)
    with pytest.raises(ValueError, match="baseline must be one of"):
        ScstConfig(baseline="beam")
    ScstConfig(samples=1, baseline="greedy")  # one sample is enough against the greedy caption


def test_sampling_masks_after_end_and_matches_teacher_forcing(task):
    model = task["model"]  # eval mode: no dropout, so both passes see the same model
    feats = task["train"][0][:12]
    torch.manual_seed(3)
    max_len = 20
    ctx = model.context(feats).copy()
    tokens, logp, mask = sample_captions(model, ctx, max_len)
    assert tokens.shape == logp.shape == mask.shape and tokens.shape[1] <= max_len + 1
    for row, m in zip(tokens.tolist(), mask.tolist(), strict=True):
        end = row.index(END_ID)  # every caption ends (forced at max_len)
        assert m == [True] * (end + 1) + [False] * (len(row) - end - 1)
        assert all(t == PAD_ID for t in row[end + 1 :])
        assert PAD_ID not in row[:end] and START_ID not in row[:end]
    # the sum of the kept log-probs is the caption's log-likelihood under teacher forcing, with
    # the same next-word rules; nothing after <end> counts
    full = torch.cat([torch.full((len(tokens), 1), START_ID), tokens], 1)  # [R, T+1]
    with torch.no_grad():
        logits, _ = model(ctx, full)  # [R, T, V]
    rules = NextWordRules(DecodeConfig(beam_size=1, max_len=max_len), logits.shape[-1])
    steps = [
        torch.log_softmax(rules.apply(torch.log_softmax(logits[:, t], -1), t, None), -1)
        for t in range(tokens.shape[1])
    ]
    forced = torch.stack(steps, 1).gather(2, tokens[..., None]).squeeze(-1)  # [R, T]
    torch.testing.assert_close((logp * mask).sum(1), (forced * mask).sum(1), atol=1e-4, rtol=1e-4)

    # the loss's gradient is zero after <end> and -(r - b) / (kept tokens) before
    leaf = logp.detach().clone().requires_grad_(True)
    reward, baseline = torch.linspace(0, 1, len(tokens)), torch.full((len(tokens),), 0.25)
    self_critical_loss(leaf, mask, reward, baseline).backward()
    expected = -(reward - baseline)[:, None] * mask / mask.sum()
    torch.testing.assert_close(leaf.grad, expected)


@pytest.mark.parametrize("end_word", [False, True])
def test_reward_is_exact_cider_d(task, end_word):
    # One sampled caption for every train image: pycocoevalcap's Cider on that set takes its
    # document frequencies from exactly the references the reward was built on. With the end
    # word (SCST's default), that is Cider on captions with one more last word on both sides.
    model = copy.deepcopy(task["model"]).train()  # with dropout: varied samples
    feats, names = task["train"]
    torch.manual_seed(1)
    with torch.no_grad():
        tokens, _, _ = sample_captions(model, model.context(feats), 20)
    reward = CiderReward(task["train_refs"], task["vocab"], end_word=end_word)
    rewards = reward(tokens, names)
    texts = {n: task["vocab"].decode(row) for n, row in zip(names, tokens.tolist(), strict=True)}
    assert len(set(texts.values())) > 20
    end = " zzend" if end_word else ""
    gts = {
        n: [" ".join(normalize(r, keep_unk=False)) + end for r in task["train_refs"][n]]
        for n in names
    }
    res = {n: [" ".join(normalize(texts[n])) + end] for n in names}
    mean, per = Cider().compute_score(gts, res)
    np.testing.assert_allclose(rewards.numpy(), per, atol=1e-5)  # float32 rewards
    assert float(rewards.mean()) == pytest.approx(mean, abs=1e-5)


def test_dev_decoding_is_greedy_or_the_bundles_beam_settings():
    bundle_cfg = {"decode_defaults": {"beam_size": 5, "length_alpha": 0.5, "no_repeat_ngram": 3}}
    assert _dev_decoding(1, bundle_cfg) == DecodeConfig(beam_size=1)
    beam = _dev_decoding(3, bundle_cfg)
    assert (beam.beam_size, beam.length_alpha, beam.no_repeat_ngram) == (3, 0.5, 3)
    assert _dev_decoding(2, {}) == DecodeConfig(beam_size=2)  # a bundle without defaults


def test_a_resumed_scst_run_may_take_more_epochs_but_keeps_its_recipe(tmp_path):
    saved = asdict(ScstConfig(init="bundle"))
    more = ScstConfig(init="bundle", epochs=20, max_minutes=3.0, checkpoint_minutes=1.0)
    check_settings(tmp_path, saved, more, SCST_RESUME_FREE)  # a constant rate: nothing re-spread
    for changed in ({"patience": 9}, {"lr": 1e-4}, {"baseline": "greedy"}, {"samples": 3}):
        with pytest.raises(ValueError, match="other settings"):
            check_settings(tmp_path, saved, ScstConfig(init="bundle", **changed), SCST_RESUME_FREE)


# ---------------------------------------------------------------- the stage, end to end


def scst_config(bundle, **kw) -> ScstConfig:
    base = dict(
        init=str(bundle),
        epochs=2,
        batch_images=8,
        samples=3,
        lr=1e-3,
        max_len=12,
        checkpoint_minutes=100.0,
    )
    return ScstConfig(**{**base, **kw})


@pytest.mark.slow
def test_main_scst_writes_both_stages_and_resumes(tiny_world, tmp_path):
    from captioning.inference.captioner import Captioner

    # the session's tiny world: synthetic Flickr8k and bundles trained 2 epochs (read only here)
    data, cache, bundle = tiny_world.data, tiny_world.cache, tiny_world.models / "resnet50-inject"
    straight = tmp_path / "scst"
    result = main_scst(scst_config(bundle), str(data), straight, cache, resume=False)
    assert not result["stopped"]
    history = json.loads((straight / "history.json").read_text())
    assert [(h["stage"], h["epoch"]) for h in history] == [
        ("xe", 1),
        ("xe", 2),
        ("scst", 3),
        ("scst", 4),
    ]
    for key in ("reward", "scst_loss", "dev_cider", "dev_bleu4", "epoch_seconds", "lr"):
        assert key in history[-1], key
    assert history[-1]["reward"] > 0
    config = json.loads((straight / "config.json").read_text())
    assert config["train_config"]["objective"] == "scst"
    assert config["train_config"]["xe_train_config"]["decoder"] == "inject"
    assert config["best_epoch"] in (2, 3, 4)
    cap = Captioner.load(straight, precision="fp32", runtime="torch")
    assert cap.caption(data / "Images" / "0000_synthetic.png", beam_size=1).text

    with pytest.raises(ValueError, match="is the --init bundle"):
        main_scst(scst_config(bundle), str(data), bundle, cache, resume=False)
    with pytest.raises(ValueError, match="not empty"):
        main_scst(scst_config(bundle), str(data), straight, cache, resume=False)

    resumed = tmp_path / "resumed"
    killed = scst_config(bundle, max_minutes=1e-9)  # stops after one batch
    assert main_scst(killed, str(data), resumed, cache, resume=False)["stopped"]
    main_scst(scst_config(bundle), str(data), resumed, cache, resume=True)
    a = load_file(straight / "decoder.safetensors")
    b = load_file(resumed / "decoder.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-3, msg=k)
    hb = json.loads((resumed / "history.json").read_text())
    assert [h["reward"] for h in hb[2:]] == pytest.approx([h["reward"] for h in history[2:]])
    with pytest.raises(ValueError, match="other settings"):
        main_scst(scst_config(bundle, lr=0.5), str(data), resumed, cache, resume=True)
