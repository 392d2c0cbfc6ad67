"""LSTM caption decoders: show-and-tell ``inject``, Keras-style ``merge``, soft ``attention``
(Show, Attend and Tell) and ``updown`` (the top-down decoder of Anderson et al. 2018).

All four share one interface so that training and decoding never look at the kind:

* ``context(feats)``: per-image work, done once per image (not once per caption);
  ``feats`` is pooled [N, D] for inject/merge and the grid [N, L, C] for attention/updown.
* ``init_state(ctx)`` -> a tuple of [B, ...] tensors; ``step(ctx, state, word)`` -> log-probs
  [B, V], new state, attention [B, L] or None. Beam search reorders states with ``index_select``.
* ``forward(ctx, tokens)``: teacher forcing; tokens [B, T] start with ``<start>``; returns
  logits [B, T-1, V] for the next words and the attention weights [B, T-1, L] (or None).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

DECODER_KINDS = ("inject", "merge", "attention", "updown")
ATTENTION_KINDS = ("attention", "updown")  # decoders that attend over the grid
INJECT_MODES = ("init", "par")


@dataclass
class DecoderConfig:
    kind: str = "attention"
    vocab_size: int = 0
    feat_dim: int = 2048  # pooled dim (inject/merge) or grid channels (attention)
    embed_dim: int = 256
    hidden_dim: int = 512
    attn_dim: int = 512
    merge_dim: int = 256
    dropout: float = 0.4
    feat_dropout: float = 0.0
    alpha_c: float = 1.0  # λ of the doubly stochastic attention regulariser
    # inject only: "init" = the image sets the LSTM's initial h and c (Show and Tell); "par" =
    # also an image vector beside every word at the LSTM's input (Tanti et al. 2018's par-inject)
    inject_mode: str = "init"

    def __post_init__(self) -> None:
        if self.inject_mode not in INJECT_MODES:
            raise ValueError(f"inject_mode must be one of {INJECT_MODES}, not {self.inject_mode!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DecoderConfig:
        known = cls.__dataclass_fields__
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"unknown decoder config keys {sorted(unknown)}")
        return cls(**d)

    @property
    def uses_grid(self) -> bool:
        return self.kind in ATTENTION_KINDS


class Decoder(nn.Module):
    """Shared parts: word embedding, dropout and the output layer. ``step_keys``: the per-image
    context tensors ``step`` reads (the rest is state and word), for compiled steps."""

    step_keys: tuple[str, ...] = ()

    def __init__(self, cfg: DecoderConfig, out_in: int) -> None:
        super().__init__()
        if cfg.vocab_size <= 4:
            raise ValueError("vocab_size must be set (> 4) in the decoder config")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=0)
        self.drop = nn.Dropout(cfg.dropout)
        self.feat_drop = nn.Dropout(cfg.feat_dropout)
        self.out = nn.Linear(out_in, cfg.vocab_size)

    def context(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def init_state(self, ctx: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def step(self, ctx, state, word):
        raise NotImplementedError

    def forward(self, ctx, tokens):
        raise NotImplementedError

    @staticmethod
    def select(ctx: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows of the per-image context for each caption/beam (idx [B] into N images)."""
        return {k: v.index_select(0, idx) for k, v in ctx.items()}


class InjectDecoder(Decoder):
    """Show and Tell: the image sets the LSTM's initial h and c; with ``inject_mode="par"`` an
    image vector also sits beside every word embedding at the LSTM's input."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__(cfg, cfg.hidden_dim)
        self.par = cfg.inject_mode == "par"
        self.step_keys = ("img",) if self.par else ()
        self.init_hc = nn.Linear(cfg.feat_dim, 2 * cfg.hidden_dim)
        if self.par:
            self.img_proj = nn.Linear(cfg.feat_dim, cfg.embed_dim)
        in_dim = cfg.embed_dim * (2 if self.par else 1)
        self.lstm = nn.LSTM(in_dim, cfg.hidden_dim, batch_first=True)

    def context(self, feats):  # pooled [N, D]
        feat = self.feat_drop(feats.float())
        if not self.par:
            return {"feat": feat}
        return {"feat": feat, "img": F.relu(self.img_proj(self.drop(feat)))}  # img [N, E]

    def init_state(self, ctx):
        h, c = torch.tanh(self.init_hc(ctx["feat"])).chunk(2, dim=-1)  # [B, H] each
        return h.contiguous(), c.contiguous()

    def _inputs(self, ctx, emb: torch.Tensor) -> torch.Tensor:
        """emb [B, T, E] -> LSTM input [B, T, E] (init) or [B, T, 2E] (par)."""
        if not self.par:
            return emb
        img = ctx["img"][:, None].expand(-1, emb.shape[1], -1)  # [B, T, E]
        return torch.cat([emb, img], dim=-1)

    def forward(self, ctx, tokens):  # tokens [B, T]
        h, c = self.init_state(ctx)
        x = self._inputs(ctx, self.drop(self.embed(tokens[:, :-1])))  # [B, T-1, E or 2E]
        out, _ = self.lstm(x, (h[None], c[None]))  # [B, T-1, H]
        return self.out(self.drop(out)), None

    def step(self, ctx, state, word):  # word [B]
        h, c = state
        x = self._inputs(ctx, self.embed(word)[:, None])  # [B, 1, E or 2E]
        out, (h2, c2) = self.lstm(x, (h[None], c[None]))
        return F.log_softmax(self.out(out[:, 0]).float(), -1), (h2[0], c2[0]), None


class MergeDecoder(Decoder):
    """Keras-style merge: LSTM over words only; its state and the image meet after the LSTM."""

    step_keys = ("img",)

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__(cfg, cfg.merge_dim)
        self.img_proj = nn.Linear(cfg.feat_dim, cfg.merge_dim)
        self.txt_proj = nn.Linear(cfg.hidden_dim, cfg.merge_dim)
        self.dense = nn.Linear(cfg.merge_dim, cfg.merge_dim)
        self.lstm = nn.LSTM(cfg.embed_dim, cfg.hidden_dim, batch_first=True)

    def context(self, feats):  # pooled [N, D]
        return {"img": self.img_proj(self.drop(self.feat_drop(feats.float())))}  # [N, M]

    def init_state(self, ctx):
        b, dev = ctx["img"].shape[0], ctx["img"].device
        zero = torch.zeros(b, self.cfg.hidden_dim, device=dev)
        return zero, zero.clone()

    def _head(self, img: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        z = F.relu(img + self.txt_proj(self.drop(h)))  # [..., M]
        return self.out(self.drop(F.relu(self.dense(z))))

    def forward(self, ctx, tokens):
        x = self.drop(self.embed(tokens[:, :-1]))  # [B, T-1, E]
        out, _ = self.lstm(x)  # [B, T-1, H]
        return self._head(ctx["img"][:, None], out), None

    def step(self, ctx, state, word):
        h, c = state
        out, (h2, c2) = self.lstm(self.embed(word)[:, None], (h[None], c[None]))
        return F.log_softmax(self._head(ctx["img"], out[:, 0]).float(), -1), (h2[0], c2[0]), None


class GridDecoder(Decoder):
    """A decoder that attends over the grid: one teacher-forced loop for every such decoder.

    Subclasses define ``_advance(ctx, state, emb) -> (state, outs, alpha)``, one step of the
    recurrence from the current word's embedding, and ``_head(*outs) -> logits``, the output layer
    over what ``_advance`` returned (run once per step in ``step``, once over all positions in
    ``forward``).
    """

    def _advance(self, ctx, state, emb):
        raise NotImplementedError

    def _head(self, *outs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, ctx, state, word):
        state, outs, alpha = self._advance(ctx, state, self.embed(word))  # word [B]
        return F.log_softmax(self._head(*outs).float(), -1), state, alpha

    def forward(self, ctx, tokens):
        """Teacher forcing over rows sorted by length: step t runs only the rows still active.

        Rows are processed longest first, so the active rows at step t are a prefix and every
        slice is a view. The output layer runs once, after the loop, on the packed positions.
        """
        b, t1 = tokens.shape[0], tokens.shape[1] - 1
        steps = (tokens[:, 1:] != 0).sum(1)  # [B] next-word targets per row
        order = torch.argsort(steps, descending=True, stable=True)
        resort = bool((order != torch.arange(b)).any())
        if resort:  # callers that sort (training) skip this copy
            tokens, steps = tokens.index_select(0, order), steps.index_select(0, order)
            ctx = self.select(ctx, order)
        active = [int((steps > t).sum()) for t in range(int(steps.max()) if b else 0)]
        state = self.init_state(ctx)
        emb = self.drop(self.embed(tokens[:, :-1]))  # [B, T-1, E]
        outs, alphas = [], []
        for t, bt in enumerate(active):
            sub = {k: ctx[k][:bt] for k in self.step_keys}
            state, out, alpha = self._advance(sub, tuple(s[:bt] for s in state), emb[:bt, t])
            outs.append(out)
            alphas.append(F.pad(alpha, (0, 0, 0, b - bt)))  # [B, L]
        packed = self._head(*(torch.cat(parts) for parts in zip(*outs, strict=True)))
        # packed position p of (t, row) -> padded [B, T-1]: row-major over t then row
        rows = torch.cat([torch.arange(bt) for bt in active])
        cols = torch.cat([torch.full((bt,), t) for t, bt in enumerate(active)])
        logits = packed.new_zeros(b, t1, packed.shape[-1])
        logits = logits.index_put((rows, cols), packed)  # [B, T-1, V]
        att = torch.stack(alphas, 1) if alphas else ctx["grid"].new_zeros(b, 0, 0)
        att = F.pad(att, (0, 0, 0, t1 - att.shape[1]))  # [B, T-1, L]
        if resort:
            inv = torch.argsort(order)
            logits, att = logits.index_select(0, inv), att.index_select(0, inv)
        return logits, att

    @staticmethod
    def _attend_with(att_v, ctx, query):  # query [B, A] -> z [B, C'], alpha [B, L]
        e = att_v(torch.tanh(ctx["proj"] + query[:, None])).squeeze(-1)  # [B, L]
        alpha = e.float().softmax(-1)
        z = torch.bmm(alpha.to(ctx["grid"].dtype)[:, None], ctx["grid"]).squeeze(1)
        return z, alpha


class AttentionDecoder(GridDecoder):
    """Show, Attend and Tell (soft): additive attention over the grid, gate β, deep output."""

    step_keys = ("proj", "grid")

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__(cfg, cfg.embed_dim)
        c, h, a = cfg.feat_dim, cfg.hidden_dim, cfg.attn_dim
        self.feat_att = nn.Linear(c, a)
        self.hid_att = nn.Linear(h, a)
        self.att_v = nn.Linear(a, 1)
        self.init_h = nn.Linear(c, h)
        self.init_c = nn.Linear(c, h)
        self.gate = nn.Linear(h, c)
        self.cell = nn.LSTMCell(cfg.embed_dim + c, h)
        # deep output (Xu et al. eq. 7): L_o(E y + L_h h + L_z z)
        self.out_h = nn.Linear(h, cfg.embed_dim)
        self.out_z = nn.Linear(c, cfg.embed_dim)

    def context(self, feats):  # grid [N, L, C]
        grid = self.feat_drop(feats.float())
        return {"grid": grid, "proj": self.feat_att(grid), "mean": grid.mean(1)}

    def init_state(self, ctx):
        return torch.tanh(self.init_h(ctx["mean"])), torch.tanh(self.init_c(ctx["mean"]))

    def _attend(self, ctx, h):  # h [B, H] -> gated z [B, C], alpha [B, L]
        z, alpha = self._attend_with(self.att_v, ctx, self.hid_att(h))
        return torch.sigmoid(self.gate(h)) * z, alpha

    def _advance(self, ctx, state, emb):
        h, c = state
        z, alpha = self._attend(ctx, h)
        h, c = self.cell(torch.cat([emb, z], -1), (h, c))
        return (h, c), (emb, h, z), alpha

    def _head(self, emb, h, z):
        return self.out(self.drop(emb + self.out_h(self.drop(h)) + self.out_z(z)))


class UpDownDecoder(GridDecoder):
    """The top-down captioner of Anderson et al. 2018 ("Bottom-up and top-down attention") over
    the encoder's grid: two LSTMs per word.

    The *attention LSTM* reads the language LSTM's last output, the mean image and the word; its
    output queries additive attention over the grid cells; the *language LSTM* reads the
    attended image and the attention LSTM's output, and the word comes from its output. Grid
    cells are first embedded to ``hidden_dim`` (linear, ReLU, dropout). The state is
    (h_att, c_att, h_lang, c_lang), zeros at the start.
    """

    step_keys = ("proj", "grid", "mean")

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__(cfg, cfg.hidden_dim)
        h, a = cfg.hidden_dim, cfg.attn_dim
        self.feat_embed = nn.Linear(cfg.feat_dim, h)
        self.feat_att = nn.Linear(h, a)
        self.hid_att = nn.Linear(h, a)
        self.att_v = nn.Linear(a, 1)
        self.att_lstm = nn.LSTMCell(h + h + cfg.embed_dim, h)
        self.lang_lstm = nn.LSTMCell(h + h, h)

    def context(self, feats):  # grid [N, L, C]
        grid = self.drop(F.relu(self.feat_embed(self.feat_drop(feats.float()))))  # [N, L, H]
        return {"grid": grid, "proj": self.feat_att(grid), "mean": grid.mean(1)}

    def init_state(self, ctx):
        zero = ctx["mean"].new_zeros(ctx["mean"].shape[0], self.cfg.hidden_dim)  # [B, H]
        return zero, zero.clone(), zero.clone(), zero.clone()

    def _advance(self, ctx, state, emb):
        h_att, c_att, h_lang, c_lang = state
        x = torch.cat([h_lang, ctx["mean"].to(h_lang.dtype), emb], -1)  # [B, 2H + E]
        h_att, c_att = self.att_lstm(x, (h_att, c_att))
        z, alpha = self._attend_with(self.att_v, ctx, self.hid_att(h_att))  # [B, H], [B, L]
        h_lang, c_lang = self.lang_lstm(torch.cat([z.to(h_att.dtype), h_att], -1), (h_lang, c_lang))
        return (h_att, c_att, h_lang, c_lang), (h_lang,), alpha

    def _head(self, h_lang):
        return self.out(self.drop(h_lang))


def build_decoder(cfg: DecoderConfig) -> Decoder:
    kinds = {
        "inject": InjectDecoder,
        "merge": MergeDecoder,
        "attention": AttentionDecoder,
        "updown": UpDownDecoder,
    }
    if cfg.kind not in kinds:
        raise ValueError(f"unknown decoder {cfg.kind!r}; choose from {', '.join(kinds)}")
    return kinds[cfg.kind](cfg)


def caption_loss(
    logits: torch.Tensor,  # [B, T-1, V]
    tokens: torch.Tensor,  # [B, T]
    alphas: torch.Tensor | None,  # [B, T-1, L]
    alpha_c: float,
    pad_id: int = 0,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on the next words (pads ignored) + λ·mean_l (1 - Σ_t α_tl)² for attention.

    The regulariser averages over the L grid cells (λ·Σ_l(...)²/L), so one λ suits 49 and 196
    cells alike. ``label_smoothing`` ε trains toward (1 - ε)·one-hot + ε/V (torch's
    definition): (1 - ε)·CE + ε·mean_v(-log p_v).

    Returns (loss to optimise, plain cross-entropy: what training and dev losses report).
    """
    target = tokens[:, 1:]  # [B, T-1]
    keep = target != pad_id  # [B, T-1]; padded positions cost nothing
    logp = F.log_softmax(logits[keep].float(), -1)  # [P, V]
    ce = F.nll_loss(logp, target[keep])
    loss = ce
    if label_smoothing:
        loss = (1.0 - label_smoothing) * ce - label_smoothing * logp.mean(-1).mean()
    if alphas is not None and alpha_c != 0:
        mask = (target != pad_id).float()[..., None]  # [B, T-1, 1]
        coverage = (alphas.float() * mask).sum(1)  # [B, L]
        loss = loss + alpha_c * ((1.0 - coverage) ** 2).mean()
    return loss, ce.detach()
