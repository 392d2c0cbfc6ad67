"""Model bundles (a directory of safetensors + JSON) and the ``Captioner`` API.

A bundle ``artifacts/models/NAME/`` holds ``decoder.safetensors`` (fp16), ``config.json``,
``vocab.json``, ``history.json``, ``metrics.json``, ``predictions_*.csv`` and ``card.md``. Loading
uses safetensors and JSON only, and refuses a bundle whose encoder weights differ from ours.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from captioning.decoders import Decoder, DecoderConfig, build_decoder
from captioning.decoding import DecodeConfig, Hypothesis, decode
from captioning.encoders import ARTIFACTS_DIR, LoadedEncoder, preprocess, shared_encoder
from captioning.fileio import (
    atomic_save_safetensors,
    atomic_write_json,
    atomic_write_text,
    read_json,
)
from captioning.images import ImageLoadError, iter_image_files, load_image
from captioning.vocab import Vocabulary

MODELS_DIR = ARTIFACTS_DIR / "models"
MODELS_ENV = "CAPTIONING_MODELS"  # overrides MODELS_DIR (e.g. for tests and the dashboard)
BUNDLE_FORMAT = "captioning-bundle"
REQUIRED_FILES = ("config.json", "decoder.safetensors", "vocab.json")


class BundleError(ValueError):
    """A bundle is missing, incomplete or incompatible."""


# ---------------------------------------------------------------- writing


def export_bundle(
    out: Path,
    model: Decoder,
    vocab: Vocabulary,
    *,
    cfg,
    dcfg: DecoderConfig,
    history: list[dict],
    best_epoch: int,
    commit: str | None,
) -> None:
    """Write a self-contained bundle (weights fp16) next to the training state."""
    from captioning.encoders import weights_sha256

    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    atomic_save_safetensors(out / "decoder.safetensors", sd, metadata={"format": "fp16"})
    vocab.save(out / "vocab.json")
    config = {
        "format": BUNDLE_FORMAT,
        "version": 1,
        "name": out.name,
        "encoder": cfg.encoder,
        "decoder": dcfg.kind,
        "encoder_sha256": weights_sha256(cfg.encoder),
        "encoder_precision_in_training": cfg.precision,
        "decoder_config": dcfg.to_dict(),
        "train_config": asdict(cfg),
        "best_epoch": best_epoch,
        "decode_defaults": asdict(DecodeConfig()),
        "git_commit": commit,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    atomic_write_json(out / "config.json", config)
    atomic_write_json(out / "history.json", history)
    if not (out / "metrics.json").exists():
        atomic_write_json(out / "metrics.json", {})
    write_card(out)


def write_card(bundle: Path) -> None:
    """``card.md``: what the model is, the data, the protocol and the scores recorded so far."""
    cfg = read_json(bundle / "config.json")
    metrics = read_json(bundle / "metrics.json") if (bundle / "metrics.json").exists() else {}
    history = read_json(bundle / "history.json") if (bundle / "history.json").exists() else []
    d = cfg["decoder_config"]
    lines = [
        f"# {cfg['name']}",
        "",
        f"An image captioner: the `{cfg['encoder']}` ImageNet encoder (frozen) and a "
        f"`{cfg['decoder']}` LSTM decoder (hidden {d['hidden_dim']}, embedding {d['embed_dim']}, "
        f"dropout {d['dropout']}) with a {d['vocab_size']}-word vocabulary.",
        "",
        "- Data: Flickr8k, official split; trained on the 6000 train images (all captions), "
        "checkpoint chosen on dev BLEU-4 (greedy).",
        f"- Best epoch: {cfg['best_epoch']} of {len(history)}; encoder weights sha256 "
        f"`{cfg['encoder_sha256'][:16]}…`; git commit `{cfg.get('git_commit')}`.",
        f"- Default decoding: beam {cfg.get('decode_defaults', {}).get('beam_size')}, length "
        f"normalisation α {cfg.get('decode_defaults', {}).get('length_alpha')} (chosen on dev).",
        "- Protocol: corpus BLEU-1..4 (nltk, all 5 references, no smoothing), CIDEr-D, METEOR "
        "and ROUGE-L (pycocoevalcap) on lowercased, punctuation-stripped tokens; 0–100 scale.",
        "",
        "| split | beam | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | METEOR | ROUGE-L | CIDEr-D |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for split in sorted(metrics):
        for key in sorted(metrics[split], key=lambda k: int(k.removeprefix("beam"))):
            m = metrics[split][key]
            cells = [
                m.get(k) for k in ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rougeL", "cider")
            ]
            vals = " | ".join("—" if v is None else f"{v:.1f}" for v in cells)
            lines.append(f"| {split} | {m.get('beam')} | {vals} |")
    lines += [
        "",
        'Load it with `Captioner.load("' + cfg["name"] + '")` or '
        f"`python -m captioning caption --model {cfg['name']} IMAGE`.",
        "",
    ]
    atomic_write_text(bundle / "card.md", "\n".join(lines))


def set_decode_defaults(bundle: Path, **changes) -> dict:
    """Change the bundle's default decoding (e.g. the beam size chosen on dev)."""
    cfg = read_config(bundle)
    merged = {**cfg.get("decode_defaults", {}), **changes}
    DecodeConfig(**merged)  # validates the keys
    cfg["decode_defaults"] = merged
    atomic_write_json(bundle / "config.json", cfg)
    write_card(bundle)
    return merged


def record_metrics(bundle: Path, split: str, beam: int, metrics: dict) -> None:
    path = bundle / "metrics.json"
    allm = read_json(path) if path.exists() else {}
    allm.setdefault(split, {})[f"beam{beam}"] = metrics
    atomic_write_json(path, allm)
    write_card(bundle)


# ---------------------------------------------------------------- reading


def models_dir_default() -> Path:
    """``$CAPTIONING_MODELS`` if set, else ``artifacts/models``."""
    env = os.environ.get(MODELS_ENV)
    return Path(env) if env else MODELS_DIR


def resolve_bundle(name_or_path: str | Path, models_dir: Path | None = None) -> Path:
    models_dir = models_dir or models_dir_default()
    p = Path(name_or_path)
    if p.is_dir():
        return p
    cand = models_dir / str(name_or_path)
    if cand.is_dir():
        return cand
    names = [b.name for b in list_bundles(models_dir)]
    raise BundleError(
        f"no model bundle {str(name_or_path)!r} (looked for a directory and in "
        f"{models_dir}); available: {', '.join(names) or 'none'}"
    )


def read_config(bundle: Path) -> dict:
    missing = [f for f in REQUIRED_FILES if not (bundle / f).exists()]
    if missing:
        raise BundleError(f"bundle {bundle} is incomplete: missing {', '.join(missing)}")
    try:
        cfg = read_json(bundle / "config.json")
    except ValueError as e:
        raise BundleError(str(e)) from None
    if not isinstance(cfg, dict) or cfg.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{bundle / 'config.json'} is not a {BUNDLE_FORMAT} config")
    for key in ("encoder", "decoder", "encoder_sha256", "decoder_config"):
        if key not in cfg:
            raise BundleError(f"{bundle / 'config.json'} lacks the key {key!r}")
    return cfg


@dataclass
class BundleInfo:
    name: str
    path: Path
    encoder: str
    decoder: str
    metrics: dict
    config: dict


def list_bundles(models_dir: Path | None = None) -> list[BundleInfo]:
    """Every complete bundle under ``models_dir`` (default ``artifacts/models``), sorted."""
    root = models_dir or models_dir_default()
    out = []
    for d in sorted(root.glob("*/")) if root.is_dir() else []:
        try:
            cfg = read_config(d)
        except BundleError:
            continue
        metrics = read_json(d / "metrics.json") if (d / "metrics.json").exists() else {}
        out.append(BundleInfo(d.name, d, cfg["encoder"], cfg["decoder"], metrics, cfg))
    return out


def load_decoder(bundle: Path) -> tuple[Decoder, Vocabulary, dict]:
    cfg = read_config(bundle)
    vocab = Vocabulary.load(bundle / "vocab.json")
    dcfg = DecoderConfig.from_dict(cfg["decoder_config"])
    if dcfg.vocab_size != len(vocab):
        raise BundleError(
            f"{bundle}: vocab.json has {len(vocab)} words, config says {dcfg.vocab_size}"
        )
    model = build_decoder(dcfg)
    try:
        state = load_file(str(bundle / "decoder.safetensors"))
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except (RuntimeError, OSError) as e:
        raise BundleError(
            f"{bundle / 'decoder.safetensors'} does not fit its config: {e}"
        ) from None
    return model.eval(), vocab, cfg


# ---------------------------------------------------------------- Captioner


@dataclass
class CaptionResult:
    text: str
    tokens: list[str]
    score: float  # log-probability of the caption (sum over words and <end>)
    nbest: list[tuple[str, float]]  # (text, log-prob), best first
    attention: np.ndarray | None  # [n_words, gh, gw] for attention decoders
    timings: dict[str, float] = field(default_factory=dict)  # encode_ms, decode_ms


class Captioner:
    """A loaded bundle plus its (shared) encoder. ``Captioner.load("resnet50-attention")``."""

    def __init__(
        self, path: Path, config: dict, decoder: Decoder, vocab: Vocabulary, encoder: LoadedEncoder
    ) -> None:
        self.path, self.config, self.decoder, self.vocab, self.encoder = (
            path,
            config,
            decoder,
            vocab,
            encoder,
        )
        self.name = path.name
        self.defaults = DecodeConfig(**config.get("decode_defaults", {}))

    @classmethod
    def load(
        cls, name_or_path: str | Path, precision: str = "auto", models_dir: Path | None = None
    ) -> Captioner:
        path = resolve_bundle(name_or_path, models_dir)
        decoder, vocab, cfg = load_decoder(path)
        encoder = shared_encoder(cfg["encoder"], precision)
        if encoder.sha256 != cfg["encoder_sha256"]:
            raise BundleError(
                f"bundle {path.name} was trained on {cfg['encoder']} weights with sha256 "
                f"{cfg['encoder_sha256'][:12]}…, but artifacts/encoders holds "
                f"{encoder.sha256[:12]}…; they must match"
            )
        return cls(path, cfg, decoder, vocab, encoder)

    @property
    def uses_grid(self) -> bool:
        return self.decoder.cfg.uses_grid

    def decode_config(self, beam_size: int | None = None, **overrides) -> DecodeConfig:
        base = asdict(self.defaults)
        if beam_size is not None:
            base["beam_size"] = beam_size
        return DecodeConfig(**{**base, **overrides})

    def decode_features(self, feats: torch.Tensor, cfg: DecodeConfig) -> list[list[Hypothesis]]:
        """feats: pooled [N, D] or grid [N, L, C] (any float dtype) -> n-best lists."""
        return decode(self.decoder, feats.float(), cfg)

    def caption_batch(
        self, images: Sequence, beam_size: int | None = None, **overrides
    ) -> list[CaptionResult]:
        """Caption PIL images, paths or bytes. Raises ImageLoadError for unusable input."""
        cfg = self.decode_config(beam_size, **overrides)
        t0 = time.perf_counter()
        x = torch.stack([preprocess(load_image(im)) for im in images])  # [N, 3, 224, 224]
        out = self.encoder.encode(x)
        feats = out.grid if self.uses_grid else out.pooled
        t1 = time.perf_counter()
        nbests = self.decode_features(feats, cfg)
        t2 = time.perf_counter()
        n = len(images)
        timings = {"encode_ms": (t1 - t0) * 1000 / n, "decode_ms": (t2 - t1) * 1000 / n}
        return [self._result(nb, timings) for nb in nbests]

    def caption(self, image, beam_size: int | None = None, **overrides) -> CaptionResult:
        return self.caption_batch([image], beam_size, **overrides)[0]

    def _result(self, nbest: list[Hypothesis], timings: dict) -> CaptionResult:
        best = nbest[0]
        att = None
        if best.attention is not None:
            cells = best.attention.shape[-1]
            side = int(round(cells**0.5))
            att = best.attention.float().view(-1, side, side).numpy()
        words = self.vocab.decode_tokens(best.tokens)
        return CaptionResult(
            text=" ".join(words),
            tokens=words,
            score=best.logprob,
            nbest=[(self.vocab.decode(h.tokens), h.logprob) for h in nbest],
            attention=att,
            timings=dict(timings),
        )


# ---------------------------------------------------------------- CLI


def cmd_caption(args: argparse.Namespace) -> int:
    cap = Captioner.load(args.model, args.precision)
    files = iter_image_files(args.images)
    if not files:
        raise FileNotFoundError(f"no images found in {' '.join(args.images)}")
    writer = csv.writer(sys.stdout) if args.csv else None
    if writer:
        writer.writerow(["image", "caption", "logprob"])
    skipped = 0
    for path in tqdm(files, unit="img", desc=f"caption {cap.name}", disable=len(files) < 2):
        try:
            res = cap.caption(path, beam_size=args.beam)
        except ImageLoadError as e:
            tqdm.write(f"skipped: {e}", file=sys.stderr)
            skipped += 1
            continue
        if args.json:
            print(
                json.dumps(
                    {
                        "image": str(path),
                        "caption": res.text,
                        "logprob": round(res.score, 4),
                        "nbest": [{"caption": t, "logprob": round(s, 4)} for t, s in res.nbest],
                        "encode_ms": round(res.timings["encode_ms"], 1),
                        "decode_ms": round(res.timings["decode_ms"], 1),
                    }
                )
            )
        elif writer:
            writer.writerow([str(path), res.text, f"{res.score:.4f}"])
        else:
            print(f"{path}: {res.text}")
    if skipped:
        print(f"{skipped} of {len(files)} files skipped", file=sys.stderr)
    return 1 if skipped else 0


def results_markdown(bundles: list[BundleInfo], split: str = "test") -> str:
    """A markdown table of every bundle's recorded metrics on ``split``, one row per beam."""
    head = (
        "| model | beam | α | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | METEOR | ROUGE-L | CIDEr-D |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for b in bundles:
        recs = b.metrics.get(split, {})
        for key in sorted(recs, key=lambda k: int(k.removeprefix("beam"))):
            m = recs[key]
            cells = [
                m.get(k) for k in ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rougeL", "cider")
            ]
            vals = " | ".join("—" if v is None else f"{v:.1f}" for v in cells)
            rows.append(f"| {b.name} | {m['beam']} | {m.get('length_alpha', 0)} | {vals} |")
    return "\n".join(rows)


def cmd_models(args: argparse.Namespace) -> int:
    bundles = list_bundles(Path(args.models_dir) if args.models_dir else None)
    if args.markdown:
        print(results_markdown(bundles, args.split))
        return 0
    if not bundles:
        print(
            f"no bundles in {args.models_dir or models_dir_default()}; train one with "
            "`python -m captioning train`"
        )
        return 0
    print(
        f"{'name':24s} {'encoder':9s} {'decoder':9s} {'test BLEU-1':>11s} {'BLEU-4':>7s} "
        f"{'CIDEr-D':>7s}  beam"
    )
    for b in bundles:
        test = b.metrics.get("test", {})
        key = next(iter(sorted(test, key=lambda k: int(k[4:]))), None) if test else None
        pref = f"beam{b.config.get('decode_defaults', {}).get('beam_size', 3)}"
        m = test.get(pref) or (test.get(key) if key else None)
        if m:
            print(
                f"{b.name:24s} {b.encoder:9s} {b.decoder:9s} {m['bleu1']:11.1f} "
                f"{m['bleu4']:7.1f} {m['cider']:7.1f}  {m['beam']}"
            )
        else:
            print(f"{b.name:24s} {b.encoder:9s} {b.decoder:9s} {'(not evaluated on test)':>27s}")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser(
        "caption",
        help="caption image files and folders with a bundle",
        description="Caption images with a model bundle.",
    )
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--model", required=True, help="bundle name in artifacts/models, or a path")
    p.add_argument("--beam", type=int, default=None, help="beam size (default: the bundle's)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON object per image")
    fmt.add_argument("--csv", action="store_true", help="CSV with image,caption,logprob")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser(
        "models",
        help="list the model bundles and their test scores",
        description="List model bundles.",
    )
    p.add_argument("--models-dir", help="default: artifacts/models")
    p.add_argument("--markdown", action="store_true", help="a results table, one row per beam")
    p.add_argument("--split", default="test", help="with --markdown (default: test)")
    p.set_defaults(func=cmd_models)
