"""Self-critical sequence training (Rennie et al. 2017): the CIDEr-D stage after cross-entropy.

Each batch of images is sampled ``samples`` times per image (multinomial over the decoder's
step distribution, all rows in one loop of ``max_len`` steps); the reward of a sampled caption is
its CIDEr-D against the image's train references, with document frequencies from all train
references (:class:`captioning.models.cider.CiderD`, coco scale); the baseline is the mean reward of
the image's other samples (default) or the reward of its greedy caption. The loss is
``-(r - b) * log p(word)`` summed over the words of each sample up to and including ``<end>``,
averaged over those words. Training starts from a bundle's decoder, keeps its vocabulary, and
writes a bundle whose history holds the cross-entropy epochs (``stage: "xe"``) and then the SCST
epochs (``stage: "scst"``); the epoch with the best dev CIDEr-D is exported, and it is the
starting model itself when no SCST epoch beats it. A bundle that fine-tuned its encoder's last
block (``train --finetune``) keeps that block frozen: it runs on the cached block inputs, only the
decoder learns, and the exported bundle ships the same block.

``scst_step`` is one batch's loss; :class:`SelfCritical` is the objective that a
:class:`captioning.training.run.Run` drives; ``main_scst`` is the ``train --objective scst`` run.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from captioning.bundle.catalog import resolve_bundle
from captioning.bundle.format import load_decoder, tuned_block
from captioning.core.machine import resolve_precision
from captioning.data import load_dataset
from captioning.data.vocab import END_ID, PAD_ID, START_ID, Vocabulary
from captioning.models.cider import CiderD
from captioning.models.decoders import Decoder
from captioning.models.decoding import DecodeConfig, NextWordRules
from captioning.training import finetune
from captioning.training.config import TrainConfig
from captioning.training.data import image_feats, prepare_data
from captioning.training.objective import Objective, evaluate_dev
from captioning.training.run import Run, check_export, check_out, snapshot
from captioning.training.warmstart import init_history

BASELINES = ("mean", "greedy")
# may change on --resume; the learning rate is constant, so nothing is re-spread
SCST_RESUME_FREE = ("max_minutes", "checkpoint_minutes", "epochs")


@dataclass
class ScstConfig:
    init: str = ""  # bundle (name or path) holding the cross-entropy decoder to start from
    epochs: int = 10
    batch_images: int = 16
    samples: int = 5  # sampled captions per image
    baseline: str = "mean"  # "mean" (of the image's other samples) or "greedy"
    max_len: int = 16  # sampled words, <end> excluded
    lr: float = 5e-5  # constant (Adam), as in common SCST recipes
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    patience: int = 3  # epochs without a better dev CIDEr-D before stopping
    seed: int = 0
    precision: str = ""  # encoder precision of the feature cache; "" = the bundle's
    train_precision: str = "fp32"  # fp32 | bf16 autocast for the decoder
    dev_beam: int = 1  # 1 = greedy; K > 1: beam K with the --init bundle's alpha and n-gram block
    reward_end: bool = True  # CIDEr-D with an end-of-caption word (no reward for cut-off endings)
    checkpoint_minutes: float = 3.0
    max_minutes: float = 0.0  # stop (resumably) after this long; 0 = no limit
    device: str = "cpu"  # SCST runs on the CPU (export_bundle records it)
    # filled in from the --init bundle by main_scst (recorded in the exported bundle)
    objective: str = "scst"
    encoder: str = ""
    decoder: str = ""
    xe_train_config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.baseline not in BASELINES:
            raise ValueError(
                f"baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}"
            )
        if self.samples < (2 if self.baseline == "mean" else 1):
            raise ValueError(
                f"samples must be >= 2 with the mean baseline (got {self.samples}): the baseline "
                "of a sample is the mean reward of the image's other samples"
            )
        if self.device != "cpu":
            raise ValueError(f"SCST runs on the CPU; got device {self.device!r}")
        for name in ("epochs", "batch_images", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# ---------------------------------------------------------------- reward, sampling, loss


class CiderReward:
    """CIDEr-D (coco scale) of vocabulary-id captions against each image's references.

    Document frequencies come from ``refs`` (for SCST: every train image's references).
    ``end_word`` scores the end of each caption as a word (see :class:`CiderD`), which keeps
    SCST from learning captions that stop mid-phrase.
    """

    def __init__(
        self, refs: Mapping[str, Sequence[str]], vocab: Vocabulary, *, end_word: bool = True
    ) -> None:
        self.cider = CiderD(refs, end_word=end_word)
        self.table = self.cider.word_table(vocab.itos)  # [V] vocabulary id -> CiderD word

    def __call__(self, tokens: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """tokens [R, T] (words, <end>, then <pad>) of images ``names`` [R] -> rewards [R]."""
        scores = self.cider.score_ids(tokens.cpu().numpy(), names, self.table)
        return torch.from_numpy(scores).float()


def sample_captions(
    model: Decoder,
    ctx: dict[str, torch.Tensor],
    max_len: int,
    *,
    greedy: bool = False,
    min_len: int = 1,
    block_unk: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One caption per row of ``ctx``, sampled (or argmax), all rows in one loop of steps.

    The next-word rules are decoding's (no ``<pad>``/``<start>``, optionally no ``<unk>``, no
    ``<end>`` before ``min_len`` words, only ``<end>`` after ``max_len``); the distribution is
    renormalised over the allowed words. Returns tokens [R, T] (words, ``<end>``, then
    ``<pad>``), the log-probability of each chosen token [R, T] (differentiable when grad is on)
    and mask [R, T]: True for the words and the ``<end>`` of each caption, False after it.
    """
    rules = NextWordRules(
        DecodeConfig(beam_size=1, max_len=max_len, min_len=min_len, block_unk=block_unk),
        model.cfg.vocab_size,
    )
    state = model.init_state(ctx)
    rows, device = state[0].shape[0], state[0].device
    word = torch.full((rows,), START_ID, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    tokens, logps, masks = [], [], []
    for t in range(max_len + 1):
        logp, state, _ = model.step(ctx, state, word)  # [R, V]
        logp = torch.log_softmax(rules.apply(logp.float(), t, None), -1)  # allowed words only
        probs = logp.detach().exp()
        word = probs.argmax(-1) if greedy else torch.multinomial(probs, 1).squeeze(1)  # [R]
        masks.append(~done)
        logps.append(logp.gather(1, word[:, None]).squeeze(1))
        word = word.masked_fill(done, PAD_ID)
        tokens.append(word)
        done = done | (word == END_ID)
        if bool(done.all()):
            break
    return torch.stack(tokens, 1), torch.stack(logps, 1), torch.stack(masks, 1)


def mean_of_others(reward: torch.Tensor) -> torch.Tensor:
    """Baseline of each sample: the mean reward of the image's other samples. [N, K] -> [N, K]."""
    k = reward.shape[1]
    return (reward.sum(1, keepdim=True) - reward) / (k - 1)


def self_critical_loss(
    logp: torch.Tensor,  # [R, T] log-probability of each sampled token
    mask: torch.Tensor,  # [R, T] True up to and including <end>
    reward: torch.Tensor,  # [R]
    baseline: torch.Tensor,  # [R]
) -> torch.Tensor:
    """``-(r - b) * log p`` over the sampled tokens (masked after ``<end>``), token mean."""
    advantage = (reward - baseline).to(logp.dtype).detach()  # [R]
    m = mask.to(logp.dtype)
    return -(advantage[:, None] * logp * m).sum() / m.sum().clamp_min(1.0)


def scst_step(
    model: Decoder,
    feats: torch.Tensor,  # [N, L, C] grid or [N, D] pooled
    names: Sequence[str],  # [N] image names (keys of the reward's references)
    reward: CiderReward,
    cfg: ScstConfig,
    autocast: contextlib.AbstractContextManager | None = None,
) -> tuple[torch.Tensor, dict]:
    """The loss of one batch (not yet backpropagated) and its statistics.

    ``samples`` captions per image are drawn in one batched loop over N * K rows, in the
    model's current (training) mode; the greedy baseline is decoded in eval mode, without grad.
    """
    autocast = autocast or contextlib.nullcontext()
    n, k = len(names), cfg.samples
    stats: dict[str, float] = {}
    if cfg.baseline == "greedy":
        was_training = model.training
        model.eval()
        with torch.no_grad(), autocast:
            g_tokens, _, _ = sample_captions(model, model.context(feats), cfg.max_len, greedy=True)
        model.train(was_training)
        greedy_reward = reward(g_tokens, names)  # [N]
        baseline = greedy_reward.repeat_interleave(k)  # [N*K]
        stats["greedy_reward"] = float(greedy_reward.mean())
    owner = torch.arange(n).repeat_interleave(k)  # [N*K] image of each row
    with autocast:
        ctx = model.select(model.context(feats), owner)
        tokens, logp, mask = sample_captions(model, ctx, cfg.max_len)
    rewards = reward(tokens, [names[i] for i in owner.tolist()])  # [N*K]
    if cfg.baseline == "mean":
        baseline = mean_of_others(rewards.view(n, k)).view(-1)
    loss = self_critical_loss(logp.float(), mask, rewards, baseline)
    stats.update(
        reward=float(rewards.mean()),
        words=float(mask.sum()) / len(rewards) - 1.0,  # <end> excluded
        distinct=len({tuple(r) for r in tokens.tolist()}) / len(rewards),
    )
    return loss, stats


# ---------------------------------------------------------------- the objective


def _bundle_precision(bundle_cfg: dict) -> str:
    """The feature precision a bundle was trained on: "bf16+cl" -> "bf16"; none recorded: auto."""
    label = bundle_cfg.get("precision") or bundle_cfg.get("train_config", {}).get("precision")
    return str(label or "auto").split("+")[0]


def _dev_decoding(beam: int, bundle_cfg: dict) -> DecodeConfig:
    """Dev decoding that picks the SCST epoch: greedy, or beam ``beam`` with the starting
    bundle's length penalty and n-gram blocking (the decoding the exported bundle will use)."""
    if beam == 1:
        return DecodeConfig(beam_size=1)
    base = bundle_cfg.get("decode_defaults", {})
    keep = ("length_alpha", "no_repeat_ngram", "block_unk", "max_len", "min_len")
    return DecodeConfig(beam_size=beam, **{k: base[k] for k in keep if k in base})


def _xe_settings(cfg: ScstConfig, block: str) -> TrainConfig:
    """The cross-entropy settings the starting bundle was trained with, for its data."""
    known = {f.name for f in fields(TrainConfig)}
    same = {
        "encoder": cfg.encoder,
        "decoder": cfg.decoder,
        "precision": cfg.precision,
        "device": cfg.device,
        "finetune": block or "",
    }
    return TrainConfig(**{**{k: v for k, v in cfg.xe_train_config.items() if k in known}, **same})


class SelfCritical(Objective):
    """SCST from the bundle ``init``: sampled captions, CIDEr-D reward, a baseline per sample.

    The starting model's dev scores are measured first: an SCST epoch is kept only if its dev
    CIDEr-D beats them. Epochs are numbered after the bundle's cross-entropy epochs.
    """

    label, prefix, score_key = "scst", "SCST ", "best_cider"
    resume_free = SCST_RESUME_FREE

    def __init__(self, cfg: ScstConfig, init: Path, data_dir: str | None, cache: Path | None):
        model, vocab, bundle_cfg = load_decoder(init)
        block = tuned_block(bundle_cfg)
        if block:  # its tuned block, frozen, runs on the cached block inputs (training.finetune)
            model = finetune.frozen_block_model(
                bundle_cfg["encoder"], block, model, init, bundle_cfg
            )
        self.init, self.bundle_cfg, self.xe_history = init, bundle_cfg, init_history(init)
        xe_config = bundle_cfg.get("train_config", {})
        if xe_config.get("objective") == "scst":  # SCST again from an SCST bundle
            xe_config = xe_config.get("xe_train_config", {})
        self.cfg = cfg = replace(
            cfg,
            precision=cfg.precision or _bundle_precision(bundle_cfg),
            encoder=bundle_cfg["encoder"],
            decoder=bundle_cfg["decoder"],
            xe_train_config=xe_config,
        )
        tcfg = _xe_settings(cfg, block)
        self.dataset = ds = load_dataset(data_dir)
        self.data = data = prepare_data(ds, tcfg, cache)
        if data.vocab.itos != vocab.itos:
            raise ValueError(
                f"{init}'s vocabulary ({len(vocab)} words) is not the one this data's train split "
                f"gives with min_freq={tcfg.min_freq} ({len(data.vocab)} words): SCST must use the "
                "data the bundle was trained on"
            )
        if data.encoder_sha256 and data.encoder_sha256 != bundle_cfg["encoder_sha256"]:
            raise ValueError(f"{init} was trained on features of other {cfg.encoder} weights")
        self.model, self.vocab, self.dcfg = model, vocab, model.cfg
        train_refs = {n: ds.captions[n] for n in data.train_images}
        self.reward = CiderReward(train_refs, vocab, end_word=cfg.reward_end)
        self.dev_decoding = _dev_decoding(cfg.dev_beam, bundle_cfg)
        self.autocast = resolve_precision(cfg.train_precision).autocast()
        trained = [q for q in model.parameters() if q.requires_grad]  # the decoder's
        self.opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0)

    def fresh_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """The starting model's dev scores and weights: the best so far."""
        t_eval = time.perf_counter()
        start = self.dev_score()
        xe_epochs = max((int(r.get("epoch", 0)) for r in self.xe_history), default=0)
        meta = {
            "epoch": 1,
            "step": 0,
            "history": self.xe_history,
            "xe_epochs": xe_epochs,
            "init": str(self.init),
            "init_dev": {k: round(v, 4) for k, v in start.items()},
            "init_eval_seconds": round(time.perf_counter() - t_eval, 1),
            "best_cider": start["dev_cider"],
            "best_epoch": int(self.bundle_cfg.get("best_epoch") or xe_epochs),
            "bad_epochs": 0,
            "train_config": asdict(self.cfg),
        }
        tqdm.write(json.dumps({"stage": "scst", "start_dev": meta["init_dev"]}))
        return meta, snapshot(self.model)

    def new_acc(self) -> dict:
        sums = ("loss_sum", "reward_sum", "greedy_sum")
        return {**dict.fromkeys(sums, 0.0), "images": 0, "n": 0, "seconds": 0.0}

    def step(self, names: list[str]) -> tuple[torch.Tensor, dict]:
        feats = image_feats(self.data, names, self.model.cfg.uses_grid)
        return scst_step(self.model, feats, names, self.reward, self.cfg, self.autocast)

    def account(self, acc: dict, names: list[str], loss: torch.Tensor, stats: dict) -> None:
        rows = len(names) * self.cfg.samples
        acc["loss_sum"] += float(loss.detach()) * rows
        acc["reward_sum"] += stats["reward"] * rows
        acc["greedy_sum"] += stats.get("greedy_reward", 0.0) * len(names)
        acc["images"] += len(names)
        acc["n"] += rows

    def postfix(self, acc: dict) -> dict[str, str]:
        return {"reward": f"{acc['reward_sum'] / acc['n']:.3f}"}

    def epoch_stats(self, acc: dict) -> dict:
        out = {
            "reward": acc["reward_sum"] / max(acc["n"], 1),
            "scst_loss": acc["loss_sum"] / max(acc["n"], 1),
        }
        if self.cfg.baseline == "greedy":
            out["greedy_reward"] = acc["greedy_sum"] / max(acc["images"], 1)
        return out

    def dev_score(self) -> dict[str, float]:
        return evaluate_dev(
            self.model, self.data, self.dev_decoding, precision=self.cfg.train_precision
        )

    def history_epoch(self, meta: dict, epoch: int) -> int:
        return meta["xe_epochs"] + epoch

    def record(self, meta: dict, epoch: int, stats: dict) -> dict:
        greedy = stats.get("greedy_reward")
        return {
            "stage": "scst",
            "epoch": self.history_epoch(meta, epoch),
            "stage_epoch": epoch,
            "reward": round(stats["reward"], 4),
            **({"greedy_reward": round(greedy, 4)} if greedy is not None else {}),
            "scst_loss": round(stats["scst_loss"], 4),
        }


def main_scst(
    cfg: ScstConfig,
    data_dir: str | None,
    out: Path,
    cache: Path | None,
    resume: bool,
    force: bool = False,
    export_best: bool = False,
    export_last: bool = False,
) -> dict:
    """SCST from the bundle ``cfg.init`` (or resume the run in ``out``); export the best epoch.

    ``out`` follows ``train.main``'s rules (empty, ``resume`` or ``force``; ``export_best``
    exports an unfinished run's best epoch without training, ``export_last`` its latest
    finished epoch) and must not be the starting bundle.
    """
    check_export(export_best, export_last, resume)
    if not cfg.init:
        raise ValueError("SCST starts from a trained bundle: pass --init BUNDLE")
    out = Path(out)
    init = resolve_bundle(cfg.init)
    if out.resolve() == init.resolve():
        raise ValueError(f"--out {out} is the --init bundle; write the SCST model elsewhere")
    resuming = check_out(out, resume, force)
    torch.manual_seed(cfg.seed)
    objective = SelfCritical(cfg, init, data_dir, cache)
    return Run(out, objective).execute(resuming, force, export_best, export_last)
