"""Every decoder learns the synthetic shapes task (greedy and beam search reach it).

Decoding itself is tested in tests/test_decoding.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from captioning.data.vocab import Vocabulary, pad_batch
from captioning.models.bleu import corpus_bleu_scores
from captioning.models.decoders import DecoderConfig, build_decoder, caption_loss
from captioning.models.decoding import DecodeConfig, beam_search, greedy_decode
from tests.synthetic import TinyEncoder, make_task

LR = 3e-3
STEPS = {
    "inject": 800,
    "inject-par": 600,
    "merge": 400,
    "attention": 400,
    "updown": 400,
}  # inject: slowest


def kind_and_mode(name: str) -> tuple[str, str]:
    """ "inject-par" -> ("inject", "par"); other names are kinds with the default inject mode."""
    kind, _, mode = name.partition("-")
    return kind, mode or "init"


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


def train_decoder(name: str, task, steps: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    steps = STEPS[name] if steps is None else steps
    kind, mode = kind_and_mode(name)
    pooled, grid, seqs = task["train"]
    feats = grid if DecoderConfig(kind=kind).uses_grid else pooled
    cfg = DecoderConfig(
        kind=kind,
        vocab_size=len(task["vocab"]),
        feat_dim=feats.shape[-1],
        embed_dim=32,
        hidden_dim=64,
        attn_dim=32,
        merge_dim=64,
        dropout=0.1,
        inject_mode=mode,
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


@pytest.fixture(scope="module", params=["inject", "inject-par", "merge", "attention", "updown"])
def trained(request, task):
    return request.param, train_decoder(request.param, task)


@pytest.mark.slow
def test_decoder_learns_the_task_on_held_out_pictures(trained, task):
    name, model = trained
    kind, _ = kind_and_mode(name)
    pooled, grid, refs = task["test"]
    feats = grid if DecoderConfig(kind=kind).uses_grid else pooled
    greedy = greedy_decode(model, feats)
    beam = [nb[0] for nb in beam_search(model, feats, DecodeConfig(beam_size=3, length_alpha=0.5))]
    beam1 = [nb[0] for nb in beam_search(model, feats, DecodeConfig(beam_size=1))]
    assert [h.tokens for h in beam1] == [h.tokens for h in greedy]
    for hyps in (greedy, beam):
        texts = {str(i): task["vocab"].decode(h.tokens) for i, h in enumerate(hyps)}
        bleu = corpus_bleu_scores(texts, {str(i): [r] for i, r in enumerate(refs)})
        assert bleu["bleu4"] >= 90, (name, bleu, list(texts.values())[:3])


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


@pytest.mark.parametrize("mode", ["init", "par"])
def test_inject_teacher_forcing_equals_stepwise_decoding(mode):
    """Both inject modes: forward()'s log-probs at every position equal step() fed the same words;
    par-inject's LSTM reads an image vector beside each word, init-inject's only the word."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    cfg = DecoderConfig(kind="inject", vocab_size=30, feat_dim=12, embed_dim=8, hidden_dim=10,
                        dropout=0.0, inject_mode=mode)  # fmt: skip
    model = build_decoder(cfg).eval()
    assert model.lstm.input_size == (16 if mode == "par" else 8)
    assert ("img" in model.context(torch.randn(1, 12))) == (mode == "par")
    feats = torch.randn(3, 12)
    tokens = torch.randint(3, 30, (3, 6))
    tokens[:, 0] = 1
    with torch.no_grad():
        ctx = model.context(feats)
        logits, _ = model(ctx, tokens)  # [3, 5, V]
        state = model.init_state(ctx)
        for t in range(tokens.shape[1] - 1):
            logp, state, _ = model.step(ctx, state, tokens[:, t])
            assert torch.allclose(F.log_softmax(logits[:, t], -1), logp, atol=1e-5)
        if mode == "par":  # the image reaches every step, not only the initial state
            other = dict(ctx, img=ctx["img"].flip(0))
            moved, _, _ = model.step(other, model.init_state(ctx), tokens[:, 1])
            same, _, _ = model.step(ctx, model.init_state(ctx), tokens[:, 1])
            assert not torch.allclose(moved, same)


def test_unknown_inject_mode():
    with pytest.raises(ValueError, match="inject_mode must be one of"):
        DecoderConfig(kind="inject", vocab_size=10, inject_mode="pre")
    with pytest.raises(ValueError, match="inject_mode must be one of"):
        DecoderConfig.from_dict({"kind": "inject", "vocab_size": 10, "inject_mode": ""})


def test_unknown_decoder_kind():
    with pytest.raises(ValueError, match="unknown decoder"):
        build_decoder(DecoderConfig(kind="transformer", vocab_size=10))


@pytest.mark.parametrize("kind", ["attention", "updown"])
def test_attention_packed_teacher_forcing_equals_stepwise_decoding(kind):
    """forward() shrinks its batch as captions end; every real position must equal step()."""
    torch.manual_seed(0)
    cfg = DecoderConfig(
        kind=kind, vocab_size=40, feat_dim=12, embed_dim=8, hidden_dim=10, attn_dim=6
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


def test_label_smoothing_is_torchs_and_reports_plain_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)  # [B, T-1, V]
    tokens = torch.randint(4, 11, (3, 6))
    tokens[1, 4:] = 0  # padding costs nothing
    keep = tokens[:, 1:] != 0
    plain, ce = caption_loss(logits, tokens, None, 0.0)
    smooth, ce2 = caption_loss(logits, tokens, None, 0.0, label_smoothing=0.1)
    want = F.cross_entropy(logits[keep], tokens[:, 1:][keep], label_smoothing=0.1)
    assert float(smooth) == pytest.approx(float(want), rel=1e-6)
    assert float(plain) == pytest.approx(float(ce)) and float(ce2) == pytest.approx(float(ce))
    assert abs(float(smooth) - float(plain)) > 1e-3
