"""Every decoder learns the synthetic shapes task (greedy and beam search reach it).

Decoding itself is tested in tests/test_decoding.py.
"""

from __future__ import annotations

import pytest
import torch

from captioning.decoders import DecoderConfig, build_decoder, caption_loss
from captioning.decoding import DecodeConfig, beam_search, greedy_decode
from captioning.metrics import corpus_bleu_scores
from captioning.vocab import Vocabulary, pad_batch
from tests.synthetic import TinyEncoder, make_task

LR = 3e-3
STEPS = {"inject": 800, "merge": 400, "attention": 400}  # inject learns slowest


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread


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
    greedy = greedy_decode(model, feats)
    beam = [nb[0] for nb in beam_search(model, feats, DecodeConfig(beam_size=3, length_alpha=0.5))]
    beam1 = [nb[0] for nb in beam_search(model, feats, DecodeConfig(beam_size=1))]
    assert [h.tokens for h in beam1] == [h.tokens for h in greedy]
    for hyps in (greedy, beam):
        texts = {str(i): task["vocab"].decode(h.tokens) for i, h in enumerate(hyps)}
        bleu = corpus_bleu_scores(texts, {str(i): [r] for i, r in enumerate(refs)})
        assert bleu["bleu4"] >= 90, (kind, bleu, list(texts.values())[:3])


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


def test_attention_packed_teacher_forcing_equals_stepwise_decoding():
    """forward() shrinks its batch as captions end; every real position must equal step()."""
    import torch.nn.functional as F

    from captioning.decoders import DecoderConfig, build_decoder

    torch.manual_seed(0)
    cfg = DecoderConfig(
        kind="attention", vocab_size=40, feat_dim=12, embed_dim=8, hidden_dim=10, attn_dim=6
    )
    model = build_decoder(cfg).eval()
    grid = torch.randn(3, 5, 12)  # [N, L, C]
    lengths = [2, 7, 4, 7, 1]  # unsorted on purpose
    tokens = torch.zeros(5, 9, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, 0], tokens[i, 1 : n + 1], tokens[i, n + 1] = 1, torch.randint(4, 40, (n,)), 2
    owner = torch.tensor([0, 1, 2, 0, 1])
    ctx = model.select(model.context(grid), owner)
    with torch.no_grad():
        logits, alphas = model(ctx, tokens)  # [5, 8, V], [5, 8, L]
        state = model.init_state(ctx)
        for t in range(tokens.shape[1] - 1):
            logp, state, alpha = model.step(ctx, state, tokens[:, t])
            live = tokens[:, t + 1] != 0
            assert torch.allclose(F.log_softmax(logits[live, t], -1), logp[live], atol=1e-5)
            assert torch.allclose(alphas[live, t], alpha[live], atol=1e-6)
            assert (alphas[~live, t] == 0).all()
