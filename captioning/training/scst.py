"""Self-critical sequence training (Rennie et al. 2017): the CIDEr-D stage after cross-entropy.

Shaped like ``captioning.train``: ``scst_step``, ``train_one_epoch_scst`` and ``main_scst``.
Each batch of images is sampled ``samples`` times per image (multinomial over the decoder's
step distribution, all rows in one loop of ``max_len`` steps); the reward of a sampled caption is
its CIDEr-D against the image's train references, with document frequencies from all train
references (:class:`captioning.metrics.CiderD`, coco scale); the baseline is the mean reward of
the image's other samples (default) or the reward of its greedy caption. The loss is
``-(r - b) * log p(word)`` summed over the words of each sample up to and including ``<end>``,
averaged over those words. Training starts from a bundle's decoder, keeps its vocabulary, and
writes a bundle whose history holds the cross-entropy epochs (``stage: "xe"``) and then the SCST
epochs (``stage: "scst"``); the epoch with the best dev CIDEr-D is exported, and it is the
starting model itself when no SCST epoch beats it. A bundle that fine-tuned its encoder's last
block (``train --finetune``) keeps that block frozen: it runs on the cached block inputs, only the
decoder learns, and the exported bundle ships the same block.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from captioning.core.files import atomic_write_json
from captioning.core.machine import git_commit, resolve_precision
from captioning.data import load_dataset
from captioning.data.vocab import END_ID, PAD_ID, START_ID, Vocabulary
from captioning.models.cider import CiderD
from captioning.models.decoders import Decoder
from captioning.models.decoding import DecodeConfig, NextWordRules
from captioning.training import finetune
from captioning.training.train import (
    SELECT_METRIC,
    STATE_DIR,
    TrainConfig,
    TrainData,
    check_export,
    check_out,
    clear_out,
    epoch_order,
    epoch_timing,
    evaluate_dev,
    image_feats,
    init_history,
    last_epoch,
    load_state,
    prepare_data,
    save_state,
)

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


# ---------------------------------------------------------------- loop


def train_one_epoch_scst(
    model: Decoder, opt, sched, data: TrainData, reward: CiderReward, cfg: ScstConfig,
    epoch: int, start_step: int, acc: dict, on_step,
) -> dict:  # fmt: skip
    """One SCST pass over the train images in this epoch's fixed order, from batch ``start_step``.

    ``acc`` carries a resumed epoch's running sums (loss, reward, greedy reward, samples,
    seconds); ``on_step(step)`` returns True to stop (time budget), as in ``train``.
    """
    model.train()
    uses_grid = model.cfg.uses_grid
    order = epoch_order(data.train_images, cfg.seed, epoch)
    n_batches = math.ceil(len(order) / cfg.batch_images)
    autocast = resolve_precision(cfg.train_precision).autocast()
    bar = tqdm(range(start_step, n_batches), desc=f"scst {epoch}", unit="batch", leave=False)
    t0 = time.perf_counter() - acc["seconds"]
    for step in bar:
        names = order[step * cfg.batch_images : (step + 1) * cfg.batch_images]
        loss, stats = scst_step(
            model, image_feats(data, names, uses_grid), names, reward, cfg, autocast
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        rows = len(names) * cfg.samples
        acc["loss_sum"] += float(loss.detach()) * rows
        acc["reward_sum"] += stats["reward"] * rows
        acc["greedy_sum"] += stats.get("greedy_reward", 0.0) * len(names)
        acc["images"] += len(names)
        acc["n"] += rows
        acc["seconds"] = time.perf_counter() - t0
        bar.set_postfix(reward=f"{acc['reward_sum'] / acc['n']:.3f}")
        if on_step(step + 1):
            bar.close()
            return {"stopped": True}
    out = {
        "reward": acc["reward_sum"] / max(acc["n"], 1),
        "scst_loss": acc["loss_sum"] / max(acc["n"], 1),
        "samples": acc["n"],
        "seconds": acc["seconds"],
        "stopped": False,
    }
    if cfg.baseline == "greedy":
        out["greedy_reward"] = acc["greedy_sum"] / max(acc["images"], 1)
    return out


def _bundle_precision(bundle_cfg: dict) -> str:
    """The feature precision a bundle was trained on: "bf16+cl" -> "bf16"; old bundles: auto."""
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
    finished epoch) and must not be the starting bundle. The starting model's dev scores are
    measured first: an SCST epoch is kept only if its dev CIDEr-D beats them.
    """
    from captioning.bundle.card import write_card
    from captioning.bundle.catalog import resolve_bundle
    from captioning.bundle.export import export_bundle
    from captioning.bundle.format import load_decoder, tuned_block

    check_export(export_best, export_last, resume)
    if not cfg.init:
        raise ValueError("SCST starts from a trained bundle: pass --init BUNDLE")
    out = Path(out)
    init = resolve_bundle(cfg.init)
    if out.resolve() == init.resolve():
        raise ValueError(f"--out {out} is the --init bundle; write the SCST model elsewhere")
    resuming = check_out(out, resume, force)
    torch.manual_seed(cfg.seed)
    model, vocab, bundle_cfg = load_decoder(init)
    block = tuned_block(bundle_cfg)
    if block:  # its tuned block, frozen, runs on the cached block inputs (captioning.finetune)
        model = finetune.frozen_block_model(bundle_cfg["encoder"], block, model, init, bundle_cfg)
    xe_history = init_history(init)
    xe_config = bundle_cfg.get("train_config", {})
    if xe_config.get("objective") == "scst":  # SCST again from an SCST bundle
        xe_config = xe_config.get("xe_train_config", {})
    cfg = replace(
        cfg,
        precision=cfg.precision or _bundle_precision(bundle_cfg),
        encoder=bundle_cfg["encoder"],
        decoder=bundle_cfg["decoder"],
        xe_train_config=xe_config,
    )
    known = {f.name for f in fields(TrainConfig)}
    same = {"encoder": cfg.encoder, "decoder": cfg.decoder, "precision": cfg.precision,
            "device": cfg.device, "finetune": block or ""}  # fmt: skip
    tcfg = TrainConfig(**{**{k: v for k, v in cfg.xe_train_config.items() if k in known}, **same})
    ds = load_dataset(data_dir)
    data = prepare_data(ds, tcfg, cache)
    if data.vocab.itos != vocab.itos:
        raise ValueError(
            f"{init}'s vocabulary ({len(vocab)} words) is not the one this data's train split "
            f"gives with min_freq={tcfg.min_freq} ({len(data.vocab)} words): SCST must use the "
            "data the bundle was trained on"
        )
    if data.encoder_sha256 and data.encoder_sha256 != bundle_cfg["encoder_sha256"]:
        raise ValueError(f"{init} was trained on features of other {cfg.encoder} weights")
    reward = CiderReward(
        {n: ds.captions[n] for n in data.train_images}, vocab, end_word=cfg.reward_end
    )
    dev_decoding = _dev_decoding(cfg.dev_beam, bundle_cfg)
    trained = [q for q in model.parameters() if q.requires_grad]  # the decoder's
    opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    xe_epochs = max((int(r.get("epoch", 0)) for r in xe_history), default=0)
    best: dict[str, torch.Tensor] | None
    if resuming:
        meta, best = load_state(out, model, opt, sched)
        free = SCST_RESUME_FREE
        saved = {k: v for k, v in meta["train_config"].items() if k not in free}
        if saved != {k: v for k, v in asdict(cfg).items() if k not in free}:
            raise ValueError(
                f"{out} was trained with other settings: {meta['train_config']}; "
                "resume with the same flags"
            )
        meta["train_config"] = asdict(cfg)
        print(f"resumed SCST at epoch {meta['epoch']}, batch {meta['step']}", file=sys.stderr)
    else:
        if force:
            clear_out(out)
        t_eval = time.perf_counter()
        # the starting model's dev scores: an SCST epoch must beat them
        start = evaluate_dev(model, data, dev_decoding, precision=cfg.train_precision)
        meta = {
            "epoch": 1,
            "step": 0,
            "history": xe_history,
            "xe_epochs": xe_epochs,
            "init": str(init),
            "init_dev": {k: round(v, 4) for k, v in start.items()},
            "init_eval_seconds": round(time.perf_counter() - t_eval, 1),
            "best_cider": start["dev_cider"],
            "best_epoch": int(bundle_cfg.get("best_epoch") or xe_epochs),
            "bad_epochs": 0,
            "train_config": asdict(cfg),
        }
        best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        tqdm.write(json.dumps({"stage": "scst", "start_dev": meta["init_dev"]}))
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    last_ckpt = [time.monotonic()]

    def on_step(step: int) -> bool:
        """Periodic checkpoints mid-epoch; True when the time budget is spent."""
        over = cfg.max_minutes and (time.monotonic() - started) / 60 > cfg.max_minutes
        if over or (time.monotonic() - last_ckpt[0]) / 60 > cfg.checkpoint_minutes:
            save_state(out, model, opt, sched, {**meta, "step": step}, best)
            last_ckpt[0] = time.monotonic()
        return bool(over)

    exporting = export_best or export_last  # no training: export from the state as it is
    while not exporting and meta["epoch"] <= cfg.epochs and meta["bad_epochs"] < cfg.patience:
        epoch = meta["epoch"]
        acc = meta.setdefault(
            "partial",
            {"loss_sum": 0.0, "reward_sum": 0.0, "greedy_sum": 0.0, "images": 0, "n": 0,
             "seconds": 0.0},
        )  # fmt: skip
        stats = train_one_epoch_scst(
            model, opt, sched, data, reward, cfg, epoch, meta["step"], acc, on_step
        )
        if stats["stopped"]:
            print(f"time budget spent; resume with --resume (SCST epoch {epoch})", file=sys.stderr)
            return {"stopped": True, **meta}
        t_eval = time.perf_counter()
        dev = evaluate_dev(model, data, dev_decoding, precision=cfg.train_precision)
        record = {
            "stage": "scst",
            "epoch": meta["xe_epochs"] + epoch,
            "stage_epoch": epoch,
            "reward": round(stats["reward"], 4),
            **(
                {"greedy_reward": round(stats["greedy_reward"], 4)}
                if "greedy_reward" in stats
                else {}
            ),
            "scst_loss": round(stats["scst_loss"], 4),
            **{k: round(v, 4) for k, v in dev.items()},
            **epoch_timing(stats, sched, t_eval),
        }
        meta["history"].append(record)
        tqdm.write(json.dumps(record))
        if dev["dev_cider"] > meta["best_cider"]:
            meta.update(best_cider=dev["dev_cider"], best_epoch=record["epoch"], bad_epochs=0)
            best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            meta["bad_epochs"] += 1
        meta.update(epoch=epoch + 1, step=0)
        meta.pop("partial")
        save_state(out, model, opt, sched, meta, best)  # the commit point of this epoch
        atomic_write_json(out / STATE_DIR / "history.json", meta["history"])  # to watch a run
        last_ckpt[0] = time.monotonic()
    if export_last:  # the weights as the latest finished SCST epoch left them
        meta = {**meta, "best_epoch": meta["xe_epochs"] + last_epoch(meta, out)}
        best = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if best is None:  # a resumed v1 state without best weights
        raise ValueError(f"{out}'s training state holds no best weights; nothing to export")
    model.load_state_dict(best)
    export_bundle(
        out,
        finetune.decoder_of(model),
        vocab,
        cfg=cfg,
        dcfg=model.cfg,
        history=meta["history"],
        best_epoch=meta["best_epoch"],
        commit=git_commit(),
        dataset=ds,
        encoder_sha256=data.encoder_sha256,
        encoder_runtime=data.encoder_runtime,
        encoder_precision=data.encoder_precision,
        select_metric=SELECT_METRIC,
        encoder_block=finetune.export_block(out, model, cfg.encoder),  # None when frozen
    )
    write_card(out)
    return {"stopped": False, **meta}
