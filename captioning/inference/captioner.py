"""The ``Captioner`` API: a loaded bundle plus its (shared) encoder, captioning images.

``Captioner.load("resnet50-attention").caption(image)`` returns a ``CaptionResult``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from captioning.bundle.auto import bundle_precision
from captioning.bundle.catalog import resolve_bundle
from captioning.bundle.ensemble import check_members, joined_labels
from captioning.bundle.format import (
    DEFAULT_RUNTIME,
    BundleError,
    OpenBundle,
    bundle_decoding,
    open_bundle,
)
from captioning.core.files import sha256_file
from captioning.core.machine import INT8, Precision
from captioning.data.images import ImageLoadError
from captioning.data.text import tokenize
from captioning.data.vocab import Vocabulary
from captioning.inference.labels import ClassifierLabels, classifier_labels
from captioning.models.blocks import TunedBlock
from captioning.models.confidence import confidence
from captioning.models.decoders import Decoder
from captioning.models.decoding import DecodeConfig, Hypothesis, check_prefix, decode
from captioning.models.encoders import LoadedEncoder
from captioning.models.mixture import EnsembleStep, MemberFeatures
from captioning.runtime.decoders import accelerate_decoder, runtime_of, torch_step
from captioning.runtime.encoders import (
    cached_tuned_encoder,
    shared_encoder,
    torch_precision,
    tuned_encoder,
)
from captioning.runtime.openvino import hand_cores_to_openvino, resolve_runtime
from captioning.runtime.pixels import load_pixels, prefetch


@dataclass
class CaptionResult:
    text: str
    tokens: list[str]
    score: float  # log-probability of the caption (sum over words and <end>)
    nbest: list[tuple[str, float]]  # (text, log-prob), best first
    attention: np.ndarray | None  # [n_words, gh, gw] for attention decoders
    timings: dict[str, float] = field(default_factory=dict)  # encode_ms, decode_ms
    confidence: float = math.nan  # in [0, 1], from the words' probabilities (models.confidence)
    prefix: str = ""  # the words the caption was made to start with


class PrefixError(ValueError):
    """A prefix that cannot start a caption (a word outside the vocabulary, too many words)."""


def prefix_word_ids(
    vocab: Vocabulary, model: str, prefix: str | None, cfg: DecodeConfig
) -> tuple[int, ...]:
    """The word ids of ``prefix`` (tokenised as the training captions were; none for an empty
    one). PrefixError names any word outside ``model``'s vocabulary, or says the prefix is
    longer than a caption may be."""
    if prefix is None or not prefix.strip():
        return ()
    words = tokenize(prefix)
    if not words:
        raise PrefixError(f"the prefix {prefix!r} holds no words")
    unknown = [w for w in dict.fromkeys(words) if w not in vocab.stoi]
    if unknown:
        quoted = ", ".join(repr(w) for w in unknown)
        raise PrefixError(
            f"{quoted} {'is' if len(unknown) == 1 else 'are'} not in the vocabulary of {model} "
            f"({len(vocab)} words from Flickr8k's captions); start the caption with other words"
        )
    try:
        return check_prefix([vocab.stoi[w] for w in words], cfg)
    except ValueError as e:
        raise PrefixError(str(e)) from None


def dedicate_cores(cap: Captioner) -> None:
    """In a process that serves ``cap`` (and captioners like it): when all of it runs on
    OpenVINO, torch keeps one thread and the compiled models the cores
    (``captioning.runtime.openvino.hand_cores_to_openvino``); a torch captioner keeps them."""
    if cap.runtime == "openvino":
        hand_cores_to_openvino()


class Captioner:
    """A loaded bundle plus its (shared) encoder. ``Captioner.load("resnet50-attention")``."""

    runtime = DEFAULT_RUNTIME  # what runs encoder and decoder step; recorded with evaluations

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
        self.defaults = bundle_decoding(config)
        self.step_decoder = decoder  # what decoding steps run on (captioning.runtime)
        self.runtime = encoder.runtime

    @classmethod
    def load(
        cls,
        name_or_path: str | Path,
        precision: str = "auto",
        models_dir: Path | None = None,
        runtime: str = "auto",
    ) -> Captioner:
        """``runtime``: auto (OpenVINO where installed, else torch; the default everywhere),
        openvino, or torch (the reference). ``precision``: fp32, bf16, int8 (OpenVINO), or auto:
        on OpenVINO the fastest precision that passed the bundle's dev quality gate
        (``captioning.bundle.gate``), else bf16 where the CPU has native bf16, else fp32.
        Whatever fails to compile runs on torch; ``.runtime`` says what runs ("openvino+torch":
        the encoder on OpenVINO, the decoder step on torch)."""
        bundle = open_bundle(resolve_bundle(name_or_path, models_dir))
        rt = resolve_runtime(runtime)
        prec, step = bundle_precision(bundle, precision, rt)
        if rt == "torch":  # int8 is OpenVINO's: refused on an explicit torch, else auto
            prec, step = torch_precision(prec, runtime), torch_step(step, runtime)
        return cls.from_bundle(bundle, prec, step, rt)

    @classmethod
    def from_bundle(cls, bundle: OpenBundle, prec: Precision, step: str, rt: str) -> Captioner:
        """An opened bundle on runtime ``rt`` (resolved) with its encoder at ``prec`` and, on
        OpenVINO, its decoder step at ``step`` ("fp32" or "int8" weights)."""
        if bundle.decoder is None:  # an ensemble: several bundles' averaged probabilities
            return EnsembleCaptioner.load_ensemble(bundle, prec, step, rt)
        path, cfg, block = bundle.path, bundle.config, bundle.block
        encoder = None
        if block and rt == "openvino":  # compiled and cached: no torch trunk to build
            encoder = cached_tuned_encoder(cfg["encoder"], cfg["encoder_sha256"], block, prec)
        if encoder is None:
            encoder = cls._encoder(path, cfg, block, prec, rt)
        cap = cls(path, cfg, bundle.decoder, bundle.vocab, encoder)
        if encoder.runtime != "torch":
            cap._accelerate_decoder(encoder.runtime, step)
        return cap

    @staticmethod
    def _encoder(
        path: Path, cfg: dict, block: TunedBlock | None, prec: Precision, rt: str
    ) -> LoadedEncoder:
        """The bundle's encoder: the shared one, checked against the bundle's weights, with the
        bundle's fine-tuned block swapped into a copy when it has one."""
        if block:  # the shared torch trunk (fp32 for int8: it is traced, then quantised)
            base = replace(prec, dtype="fp32", calibration="") if prec.dtype == INT8 else prec
            encoder = shared_encoder(cfg["encoder"], base, "torch")
        else:
            encoder = shared_encoder(cfg["encoder"], prec, rt)
        if encoder.sha256 != cfg["encoder_sha256"]:
            raise BundleError(
                f"bundle {path.name} was trained on {cfg['encoder']} weights with sha256 "
                f"{cfg['encoder_sha256'][:12]}…, but artifacts/encoders holds "
                f"{encoder.sha256[:12]}…; they must match"
            )
        if block is None:
            return encoder
        try:  # the shared trunk with this bundle's block; the shared encoder is untouched
            return tuned_encoder(encoder, block, rt, prec)
        except ValueError as e:
            raise BundleError(str(e)) from None

    def _accelerate_decoder(self, runtime: str, step: str) -> None:
        self.step_decoder = accelerate_decoder(
            self.decoder,
            sha256_file(self.path / "decoder.safetensors"),
            step,
            runtime,
            grid_cells=self.encoder.spec.grid_cells,
        )
        step = runtime_of(self.step_decoder)
        enc = self.encoder.runtime
        self.runtime = enc if step == enc else f"{enc}+{step}"

    @property
    def uses_grid(self) -> bool:
        return self.decoder.cfg.uses_grid

    @property
    def precision_label(self) -> str:
        """The precision as records name it: the encoder's (e.g. ``bf16+cl``, ``int8``), and
        ``-int8`` when int8 decoder-step weights run beside a bf16 one (``bf16-int8``)."""
        enc = self.encoder.precision
        step = getattr(self.step_decoder, "key", None)
        int8_step = step is not None and step.precision == INT8 and enc.dtype != INT8
        return f"{enc.label}-{INT8}" if int8_step else enc.label

    @property
    def encoder_label(self) -> str:
        """How the features are computed, e.g. ``bf16+cl`` (torch) or ``bf16-openvino``."""
        return self.encoder.label

    @property
    def encoder_on_torch(self) -> bool:
        return self.encoder.runtime == "torch"

    def decode_config(self, beam_size: int | None = None, **overrides) -> DecodeConfig:
        base = asdict(self.defaults)
        if beam_size is not None:
            base["beam_size"] = beam_size
        return DecodeConfig(**{**base, **overrides})

    def prefix_ids(self, prefix: str | None, cfg: DecodeConfig | None = None) -> tuple[int, ...]:
        """The word ids of ``prefix`` for this bundle (``prefix_word_ids``)."""
        return prefix_word_ids(self.vocab, self.name, prefix, cfg or self.defaults)

    def decode_features(
        self, feats: torch.Tensor, cfg: DecodeConfig, prefix: Sequence[int] = ()
    ) -> list[list[Hypothesis]]:
        """feats: pooled [N, D] or grid [N, L, C] (any float dtype) -> n-best lists; every
        caption starts with the word ids ``prefix``."""
        return decode(self.step_decoder, feats.float(), cfg, prefix)

    def _request(self, beam_size, prefix, overrides) -> tuple[DecodeConfig, str, tuple[int, ...]]:
        """The decoding, the prefix text and its word ids; ValueError for a bad setting."""
        cfg = self.decode_config(beam_size, **overrides)
        return cfg, (prefix or "").strip(), self.prefix_ids(prefix, cfg)

    def caption_batch(
        self, images: Sequence, beam_size: int | None = None, prefix: str | None = None, **overrides
    ) -> list[CaptionResult]:
        """Caption PIL images, paths or bytes; every caption starts with ``prefix`` if given.
        Raises ImageLoadError for unusable input, PrefixError for an unusable prefix."""
        req = self._request(beam_size, prefix, overrides)
        t0 = time.perf_counter()
        x = torch.stack([load_pixels(im) for im in images])  # [N, 3, 224, 224]
        return self._caption_pixels(x, req, t0)

    def caption_pixels(
        self,
        pixels: torch.Tensor,
        beam_size: int | None = None,
        prefix: str | None = None,
        **overrides,
    ) -> list[CaptionResult]:
        """Caption decoded images: pixels [N, 3, 224, 224] from ``pipeline.load_pixels``."""
        return self._caption_pixels(pixels, self._request(beam_size, prefix, overrides))

    def labels(self, image, k: int = 5) -> ClassifierLabels:
        """A second opinion: the encoder's own top-``k`` ImageNet labels of ``image``, or why
        its weights cannot give them (``captioning.inference.labels``)."""
        return classifier_labels(self.encoder_names, image, k)

    @property
    def encoder_names(self) -> list[str]:
        return [self.config["encoder"]]

    def caption_stream(
        self,
        sources: Iterable,
        beam_size: int | None = None,
        *,
        batch_size: int = 16,
        workers: int | None = None,
        overlap: bool | None = None,
        prefix: str | None = None,
        **overrides,
    ) -> Iterator[tuple[object, CaptionResult | ImageLoadError]]:
        """Caption many images on the pipelined path. Yields (source, result or ImageLoadError)
        in input order.

        Threads decode the next batches' images meanwhile; with ``overlap`` one more thread
        encodes batch i+1 while batch i is beam-searched. None = overlap when the encoder runs
        on torch: measured on 2 cores (resnet50-attention, beam 3, batches of 16) it lifts torch
        from 22.3 to 25.6 images/s, while OpenVINO, whose encoder and step already keep both
        cores busy, drops from 37.0 to 33.7. The captions are those of ``caption_pixels``.
        """
        req = self._request(beam_size, prefix, overrides)
        batches = prefetch(sources, batch_size, workers=workers)
        if overlap is None:
            overlap = self.encoder_on_torch
        if not overlap:
            for batch in batches:
                yield from self._finish(batch, self._encode(batch.pixels), req)
            return
        pool = ThreadPoolExecutor(1, thread_name_prefix="encode")
        try:
            pending = None  # (batch, its encoding in flight)
            for batch in batches:
                encoding = pool.submit(self._encode, batch.pixels)
                if pending is not None:  # beam-search the previous batch while this one encodes
                    yield from self._finish(pending[0], pending[1].result(), req)
                pending = (batch, encoding)
            if pending is not None:
                yield from self._finish(pending[0], pending[1].result(), req)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _encode(self, x: torch.Tensor | None) -> tuple[torch.Tensor | None, float]:
        """pixels [N, 3, 224, 224] (or None) -> (decoder features, encode seconds)."""
        if x is None:
            return None, 0.0
        t0 = time.perf_counter()
        out = self.encoder.encode(x)
        return (out.grid if self.uses_grid else out.pooled), time.perf_counter() - t0

    def _finish(self, batch, encoded, req):
        """Decode one prefetched batch from its features; yields (source, result or error)."""
        feats, encode_s = encoded
        results = iter(self._decode(feats, encode_s, req) if feats is not None else ())
        for i, src in enumerate(batch.sources):
            yield src, batch.errors[i] if i in batch.errors else next(results)

    def _caption_pixels(self, x: torch.Tensor, req, t0: float | None = None) -> list[CaptionResult]:
        t0 = time.perf_counter() if t0 is None else t0  # encode_ms includes decoding the image
        feats, _ = self._encode(x)
        return self._decode(feats, time.perf_counter() - t0, req)

    def _decode(self, feats: torch.Tensor, encode_s: float, req):
        """Beam-search features [N, ...] -> N results, timed per image (``encode_s``: the
        batch's encoding, measured by the caller). ``req``: (DecodeConfig, prefix, its ids)."""
        cfg, prefix, ids = req
        t1 = time.perf_counter()
        nbests = self.decode_features(feats, cfg, ids)
        n = len(nbests)
        timings = {
            "encode_ms": encode_s * 1000 / n,
            "decode_ms": (time.perf_counter() - t1) * 1000 / n,
        }
        return [self._result(nb, timings, prefix) for nb in nbests]

    def caption(
        self, image, beam_size: int | None = None, prefix: str | None = None, **overrides
    ) -> CaptionResult:
        return self.caption_batch([image], beam_size, prefix, **overrides)[0]

    def _result(self, nbest: list[Hypothesis], timings: dict, prefix: str = "") -> CaptionResult:
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
            confidence=confidence(best.token_logprobs),
            prefix=prefix,
        )


class EnsembleCaptioner(Captioner):
    """A ``Captioner`` whose encoding is every member's and whose decoder is ``EnsembleStep``."""

    def __init__(self, path: Path, config: dict, members: list[Captioner], vocab: Vocabulary):
        weights = [m["weight"] for m in config["members"]]
        self.path, self.config, self.members, self.vocab = path, config, members, vocab
        self.name = path.name
        self.defaults = bundle_decoding(config)
        self.decoder = EnsembleStep([m.decoder for m in members], weights)  # the torch reference
        self.step_decoder = EnsembleStep([m.step_decoder for m in members], weights)
        self.runtime = joined_labels(m.runtime for m in members)

    @classmethod
    def load_ensemble(
        cls, bundle: OpenBundle, prec: Precision, step: str, runtime: str
    ) -> EnsembleCaptioner:
        """Load each member from the ensemble's own models directory and check that it is the
        member the ensemble was made and scored with. Every member runs at ``prec`` and
        ``step`` (for ``auto``: what the ensemble's own records admit, not each member's)."""
        paths = check_members(bundle.path, bundle.config, bundle.vocab)
        members = [Captioner.from_bundle(open_bundle(p), prec, step, runtime) for p in paths]
        return cls(bundle.path, bundle.config, members, bundle.vocab)

    @property
    def uses_grid(self) -> bool:
        return any(m.uses_grid for m in self.members)

    @property
    def precision_label(self) -> str:
        return joined_labels(m.precision_label for m in self.members)

    @property
    def encoder_label(self) -> str:
        return joined_labels(m.encoder_label for m in self.members)

    @property
    def encoder_on_torch(self) -> bool:
        return any(m.encoder_on_torch for m in self.members)

    def decode_features(
        self, feats: MemberFeatures, cfg: DecodeConfig, prefix: Sequence[int] = ()
    ) -> list[list[Hypothesis]]:
        return decode(self.step_decoder, feats.float(), cfg, prefix)

    @property
    def encoder_names(self) -> list[str]:
        return [name for m in self.members for name in m.encoder_names]

    def _encode(self, x: torch.Tensor | None) -> tuple[MemberFeatures | None, float]:
        """pixels [N, 3, 224, 224] -> (each member's features, seconds); members that share an
        encoder share its encoding."""
        if x is None:
            return None, 0.0
        t0 = time.perf_counter()
        done: dict[tuple[int, bool], torch.Tensor] = {}
        feats = []
        for m in self.members:
            key = (id(m.encoder), m.uses_grid)
            if key not in done:
                done[key] = m._encode(x)[0]
            feats.append(done[key])
        return MemberFeatures(feats), time.perf_counter() - t0
