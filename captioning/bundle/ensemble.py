"""Ensembles of bundles that share a vocabulary: one beam search over their averaged word
probabilities.

An ensemble bundle ``artifacts/models/NAME/`` holds no weights: ``config.json`` names its
members (sibling bundles in the same models directory) with their weights and the sha256 of
their weight files, ``vocab.json`` is the vocabulary they all share, and the usual metrics,
predictions, bench and card describe the ensemble. At each step every member runs its own
decoder on its own encoder's features and the ensemble scores a word by

    log p(w) = log sum_i weight_i * p_i(w)        (the members' probabilities averaged)

so the beam search, n-gram blocking and length normalisation work unchanged
(``captioning.models.decoding``). ``make_ensemble`` writes a bundle; ``Captioner.load`` of it
returns an ``EnsembleCaptioner``.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from captioning.bundle.catalog import find_bundle, resolve_bundle, resolve_bundles
from captioning.bundle.format import (
    BUNDLE_FORMAT,
    ENSEMBLE_KIND,
    BundleError,
    check_out_empty,
    clear_model_outputs,
    is_ensemble,
    load_decoder,
    read_config,
    weights_fingerprint,
)
from captioning.bundle.records import write_records
from captioning.core.files import atomic_write_json
from captioning.core.paths import models_dir_default
from captioning.data.vocab import Vocabulary
from captioning.models.decoding import DecodeConfig


def member_weights(members: Sequence[str], weights: Sequence[float] | None) -> list[float]:
    """One weight > 0 per member of an ensemble or a soup (default: equal), normalised to sum to
    1; raises BundleError for fewer than two different members or a bad weight."""
    if len(members) < 2 or len(set(members)) != len(members):
        raise BundleError("an ensemble or a soup needs at least two different member bundles")
    weights = list(weights) if weights else [1.0] * len(members)
    if len(weights) != len(members) or not all(math.isfinite(w) and w > 0 for w in weights):
        raise BundleError(f"give one weight > 0 per member ({len(members)}), got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def shared_vocabulary(paths: Sequence[Path]) -> Vocabulary:
    """The vocabulary every bundle of ``paths`` has; BundleError if any differs."""
    vocab = Vocabulary.load(paths[0] / "vocab.json")
    for p in paths[1:]:
        if Vocabulary.load(p / "vocab.json").itos != vocab.itos:
            raise BundleError(f"{p.name} and {paths[0].name} have different vocabularies")
    return vocab


def single_model_configs(paths: Sequence[Path]) -> list[dict]:
    """The ``config.json`` of each member of an ensemble or a soup; BundleError if a member is
    itself an ensemble (members must be single models)."""
    configs = [read_config(p) for p in paths]
    nested = [p.name for p, c in zip(paths, configs, strict=True) if is_ensemble(c)]
    if nested:
        raise BundleError(f"members must be single models, not ensembles: {', '.join(nested)}")
    return configs


def check_bundle(bundle: Path) -> dict:
    """The config of a usable bundle: its decoder loads or, for an ensemble, its members are in
    place and unchanged. Raises BundleError otherwise (callers that fail early use this)."""
    cfg = read_config(bundle)
    if is_ensemble(cfg):
        check_members(bundle, cfg)
    else:
        load_decoder(bundle)
    return cfg


def check_members(path: Path, config: dict, vocab: Vocabulary | None = None) -> list[Path]:
    """The member bundles of the ensemble at ``path``, each in place, unchanged since the ensemble
    was made and with its vocabulary (``vocab``: the ensemble's, when already loaded); raises
    BundleError otherwise (nothing is loaded)."""
    vocab = vocab or Vocabulary.load(path / "vocab.json")
    paths = []
    for m in config["members"]:
        member_path = _member_path(path, m["name"])
        _check_member(path, member_path, m, vocab)
        paths.append(member_path)
    return paths


def joined_labels(labels) -> str:
    """The members' distinct labels in order, e.g. ``openvino`` or ``bf16+cl/fp32``."""
    return "/".join(dict.fromkeys(labels))


def _member_path(path: Path, name: str) -> Path:
    try:
        return resolve_bundle(name, path.parent)
    except BundleError:
        raise BundleError(
            f"ensemble {path.name} needs the bundle {name!r} beside it in {path.parent}"
        ) from None


def new_member_paths(out: Path, members: Sequence[str]) -> list[Path]:
    """The bundles ``members`` names (names or paths) for a new ensemble at ``out``.

    An ensemble finds its members in its own folder when it loads, so each must lie in
    ``out``'s folder. Raises one BundleError naming every member that is missing (looked up in
    ``out``'s folder, or in the models directory when that is where the others are), or saying
    where the ensemble must go when the members are all in the models directory instead.
    """
    home, models = out.parent, models_dir_default()
    gone = [m for m in members if find_bundle(m, home) is None]
    if gone and not _same_dir(home, models):
        gone_there = [m for m in members if find_bundle(m, models) is None]
        if not gone_there:
            raise BundleError(
                f"an ensemble finds its members in its own folder, and {home} has no "
                f"{', '.join(gone)} (they are in {models}): give --out a path there, e.g. "
                f"--out {models / out.name}"
            )
        if len(gone_there) < len(gone):  # the models directory is where the user looks
            home = models
    paths = resolve_bundles(members, home)
    away = [str(p) for p in paths if not _same_dir(p.parent, out.parent)]
    if away:
        raise BundleError(
            f"an ensemble finds its members in its own folder, and {', '.join(away)} "
            f"{'is' if len(away) == 1 else 'are'} not in {out.parent}: write the ensemble "
            "beside its members"
        )
    return paths


def _same_dir(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _check_member(path: Path, member: Path, entry: dict, vocab: Vocabulary) -> None:
    if weights_fingerprint(member) != entry["sha256"]:
        raise BundleError(
            f"{member.name}'s weights changed since ensemble {path.name} was made and scored; "
            f"make it again (python -m captioning ensemble … --out {path} --force)"
        )
    if Vocabulary.load(member / "vocab.json").itos != vocab.itos:
        raise BundleError(f"{member.name}'s vocabulary differs from ensemble {path.name}'s")


def make_ensemble(
    out: Path,
    members: Sequence[str],
    weights: Sequence[float] | None = None,
    *,
    commit: str | None = None,
    force: bool = False,
) -> dict:
    """Write the ensemble bundle ``out`` of ``members`` (bundle names in ``out``'s directory).

    ``weights`` default to equal; they are normalised to sum to 1. The default decoding starts
    as the first member's (choose it on dev with ``tune-decoding --apply``). Returns the config.
    """
    weights = member_weights(members, weights)
    check_out_empty(out, force)
    paths = new_member_paths(out, members)
    configs = single_model_configs(paths)
    vocab = shared_vocabulary(paths)
    first = configs[0]
    config = {
        "format": BUNDLE_FORMAT,
        "version": 1,
        "kind": ENSEMBLE_KIND,
        "name": out.name,
        "encoder": ",".join(dict.fromkeys(c["encoder"] for c in configs)),  # "+" marks a block
        "decoder": ENSEMBLE_KIND,
        "members": [
            {"name": p.name, "weight": w, "sha256": weights_fingerprint(p)}
            for p, w in zip(paths, weights, strict=True)
        ],
        "precision": joined_labels(c["precision"] for c in configs),
        "runtime": joined_labels(c["runtime"] for c in configs),
        "data": first.get("data"),
        "decode_defaults": first.get("decode_defaults", asdict(DecodeConfig())),
        "git_commit": commit,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    out.mkdir(parents=True, exist_ok=True)
    clear_model_outputs(out)
    vocab.save(out / "vocab.json")
    atomic_write_json(out / "config.json", config)
    write_records(out, [], config)
    return config
