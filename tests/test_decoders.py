"""Every decoder learns the synthetic shapes task; beam search agrees with greedy."""

from __future__ import annotations

import pytest
import torch

from captioning.decoders import DecoderConfig, build_decoder, caption_loss
from captioning.decoding import DecodeConfig, beam_search, decode, greedy_decode
from captioning.metrics import corpus_bleu_scores
from captioning.vocab import Vocabulary, pad_batch
from tests.synthetic import TinyEncoder, make_task

LR = 3e-3
STEPS = {"inject": 800, "merge": 400, "attention": 400}  # inject learns slowest


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task():
    train, test = make_task(600, 60)
    enc = TinyEncoder()
    vocab = Vocabulary.build([c for _, c in train], min_freq=1)
    tr_pooled, tr_grid = enc([im for im, _ in train])
    te_pooled, te_grid = enc([im for im, _ in test])
    return {
        "vocab": vocab,
        "train": (tr_pooled, tr_grid, [vocab.encode(c) for _, c in train]),
        "test": (te_pooled, te_grid, [c for _, c in test]),
    }


def train_decoder(kind: str, task, steps: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    steps = STEPS[kind] if steps is None else steps
    pooled, grid, seqs = task["train"]
    feats = grid if kind == "attention" else pooled
    cfg = DecoderConfig(
        kind=kind,
        vocab_size=len(task["vocab"]),
        feat_dim=feats.shape[-1],
        embed_dim=32,
        hidden_dim=64,
        attn_dim=32,
        merge_dim=64,
        dropout=0.1,
    )
    model = build_decoder(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, feats.shape[0], (64,), generator=g)
        tokens, _ = pad_batch([seqs[i] for i in idx.tolist()])
        ctx = model.context(feats[idx])
        logits, alphas = model(ctx, tokens)
        loss, _ = caption_loss(logits, tokens, alphas, cfg.alpha_c)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module", params=["inject", "merge", "attention"])
def trained(request, task):
    return request.param, train_decoder(request.param, task)


def test_decoder_learns_the_task_on_held_out_pictures(trained, task):
    kind, model = trained
    pooled, grid, refs = task["test"]
    feats = grid if kind == "attention" else pooled
    hyps = greedy_decode(model, feats)
    texts = {str(i): task["vocab"].decode(h.tokens) for i, h in enumerate(hyps)}
    bleu = corpus_bleu_scores(texts, {str(i): [r] for i, r in enumerate(refs)})
    assert bleu["bleu4"] >= 90, (kind, bleu, list(texts.values())[:3])


def test_beam_one_equals_greedy(trained, task):
    kind, model = trained
    pooled, grid, _ = task["test"]
    feats = grid if kind == "attention" else pooled
    greedy = greedy_decode(model, feats)
    beam1 = decode(model, feats, DecodeConfig(beam_size=1))
    forced = beam_search(model, feats, DecodeConfig(beam_size=1))  # the beam code path, k=1
    for g, b, f in zip(greedy, beam1, forced, strict=True):
        assert g.tokens == b[0].tokens == f[0].tokens
        assert g.logprob == pytest.approx(f[0].logprob, abs=1e-4)


def test_beam_search_nbest_and_scores(trained, task):
    kind, model = trained
    pooled, grid, _ = task["test"]
    feats = (grid if kind == "attention" else pooled)[:8]
    res = beam_search(model, feats, DecodeConfig(beam_size=4, n_best=4))
    greedy = greedy_decode(model, feats)
    for nbest, g in zip(res, greedy, strict=True):
        assert 1 <= len(nbest) <= 4
        scores = [h.score for h in nbest]
        assert scores == sorted(scores, reverse=True)
        assert nbest[0].logprob >= g.logprob - 1e-4  # beam never finds a worse best
        assert len({tuple(h.tokens) for h in nbest}) == len(nbest)
        if kind == "attention":
            assert nbest[0].attention.shape == (len(nbest[0].tokens), 16)
            torch.testing.assert_close(nbest[0].attention.sum(-1), torch.ones(len(nbest[0].tokens)))
        else:
            assert nbest[0].attention is None


def test_beams_that_never_end_are_closed_at_max_len(task):
    model = train_decoder("inject", task, steps=1)  # untrained: rarely emits <end>
    pooled = task["test"][0][:3]
    cfg = DecodeConfig(beam_size=3, max_len=4)
    for nbest in beam_search(model, pooled, cfg):
        assert all(len(h.tokens) <= 4 for h in nbest)
    for h in greedy_decode(model, pooled, DecodeConfig(beam_size=1, max_len=4)):
        assert len(h.tokens) <= 4


def test_unk_is_blocked_and_min_len(task):
    model = train_decoder("merge", task, steps=1)
    with torch.no_grad():
        model.out.bias[3] = 100.0  # make <unk> overwhelmingly likely
        model.out.bias[2] = 50.0  # and <end> next
    pooled = task["test"][0][:2]
    for nbest in beam_search(model, pooled, DecodeConfig(beam_size=2, min_len=3)):
        assert 3 not in nbest[0].tokens and len(nbest[0].tokens) >= 3
    allowed = greedy_decode(model, pooled, DecodeConfig(beam_size=1, block_unk=False))
    assert allowed[0].tokens[0] == 3


def test_attention_loss_has_doubly_stochastic_term(task):
    pooled, grid, seqs = task["train"]
    cfg = DecoderConfig(
        kind="attention",
        vocab_size=len(task["vocab"]),
        feat_dim=66,
        embed_dim=16,
        hidden_dim=16,
        attn_dim=16,
        alpha_c=1.0,
    )
    model = build_decoder(cfg).eval()
    tokens, _ = pad_batch(seqs[:4])
    logits, alphas = model(model.context(grid[:4]), tokens)
    assert alphas.shape == (4, tokens.shape[1] - 1, 16)
    loss, ce = caption_loss(logits, tokens, alphas, 1.0)
    no_reg, _ = caption_loss(logits, tokens, alphas, 0.0)
    assert loss.item() > no_reg.item() == pytest.approx(ce.item())


def test_unknown_decoder_kind():
    with pytest.raises(ValueError, match="unknown decoder"):
        build_decoder(DecoderConfig(kind="transformer", vocab_size=10))
