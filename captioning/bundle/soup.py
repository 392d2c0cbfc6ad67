"""Weight-averaged bundles ("model soups", Wortsman et al. 2022): one model from several.

Bundles fine-tuned from the same start (the same frozen-encoder bundle, ``train --init``) lie
in one basin of the loss, so the weighted mean of their weights is a model of its own, as large
and as fast as each of them. ``make_soup`` writes it as an ordinary bundle: the averaged
``decoder.safetensors`` (and ``encoder_block.safetensors`` when the members fine-tuned a block),
the members' shared ``vocab.json``, and a ``config.json`` that is the first member's with the
soup's own name, block sha256 and a ``soup`` entry naming the members, their weights and the
sha256 of their weight files. Its ``history.json`` is its members' training histories, each
epoch tagged with the ``member`` it belongs to (the Training page draws one line per member).
It has no metrics or predictions: choose its decoding and score it like any new bundle
(``tune-decoding --apply``, ``evaluate --record``).

``greedy_soup`` is the paper's greedy recipe: score every candidate alone on held-out data, take
them best first, and keep each one only if the soup with it scores at least as well as without
(the caller supplies the score, e.g. dev CIDEr-D; ``soup --greedy``). The trials are recorded in
the soup's ``config.json``.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file

from captioning.bundle.catalog import resolve_bundles
from captioning.bundle.ensemble import member_weights, shared_vocabulary, single_model_configs
from captioning.bundle.format import (
    BLOCK_FILE,
    BLOCK_KEY,
    DECODER_FILE,
    DECODING_CHOSEN_KEY,
    BundleError,
    check_out_empty,
    clear_model_outputs,
    weights_fingerprint,
)
from captioning.bundle.history import read_history
from captioning.bundle.records import write_records
from captioning.core.files import atomic_save_safetensors, atomic_write_json, sha256_file

SAME = ("encoder", "encoder_sha256", "decoder", "decoder_config")  # what members must share


def _check_members(paths: Sequence[Path], configs: Sequence[dict]) -> None:
    """Raise BundleError unless every member is the same model (only weights differ)."""
    first, block = configs[0], (configs[0].get(BLOCK_KEY) or {}).get("block")
    for p, c in zip(paths[1:], configs[1:], strict=True):
        differ = [k for k in SAME if c.get(k) != first.get(k)]
        if (c.get(BLOCK_KEY) or {}).get("block") != block:
            differ.append("fine-tuned encoder block")
        if differ:
            raise BundleError(
                f"{p.name} and {paths[0].name} differ in {', '.join(differ)}: a soup averages "
                "the weights of one model (the same encoder, decoder and block)"
            )
    shared_vocabulary(paths)


def _member_paths(out: Path, members: Sequence[str]) -> list[Path]:
    """The members' bundle directories; BundleError if one repeats or ``out`` is one of them."""
    paths = resolve_bundles(members)  # one error naming every missing member
    if out.resolve() in {p.resolve() for p in paths}:
        raise BundleError(f"--out {out} is one of the members; write the soup elsewhere")
    if len({p.resolve() for p in paths}) != len(paths):
        raise BundleError("a soup needs different member bundles (give a member more weight)")
    return paths


def average_file(files: Sequence[Path], weights: Sequence[float], out: Path) -> None:
    """The weighted mean (``weights`` sum to 1) of the float tensors of safetensors ``files``,
    in the first file's dtypes and metadata; other tensors (counters) are the first file's."""
    tensors = [load_file(str(f)) for f in files]
    keys = set(tensors[0])
    for f, t in zip(files[1:], tensors[1:], strict=True):
        if set(t) != keys or any(t[k].shape != tensors[0][k].shape for k in keys):
            raise BundleError(f"{f} holds other tensors than {files[0]}")
    mean = {}
    for k, v in tensors[0].items():
        if v.is_floating_point():
            acc = sum(w * t[k].double() for w, t in zip(weights, tensors, strict=True))
            mean[k] = acc.to(v.dtype)
        else:
            mean[k] = v
    with safe_open(str(files[0]), "pt") as h:
        metadata = h.metadata()
    atomic_save_safetensors(out, mean, metadata=metadata)


def member_histories(paths: Sequence[Path]) -> list[dict]:
    """The members' ``history.json`` epochs in member order, each tagged ``member: name``
    (members without a history add nothing); a member that is a soup itself passes on its own
    members' tags, so a soup of soups draws a line per original run, and an epoch two members
    both hold (a run continued from another member, e.g. by SCST) is kept once."""
    rows, seen = [], set()
    for p in paths:
        for r in read_history(p):
            row = {**r, "member": r.get("member") or p.name}
            key = json.dumps(row, sort_keys=True)
            if key not in seen:
                seen.add(key)
                rows.append(row)
    return rows


def make_soup(
    out: Path,
    members: Sequence[str],
    weights: Sequence[float] | None = None,
    *,
    commit: str | None = None,
    force: bool = False,
    greedy: dict | None = None,
) -> dict:
    """Write the bundle ``out``: the weighted mean of ``members`` (bundle names or paths; equal
    weights by default, normalised to sum to 1). Returns its config; ``greedy`` (the trials of
    ``greedy_soup``) is recorded in its ``soup`` entry."""
    weights = member_weights(members, weights)
    paths = _member_paths(out, members)
    check_out_empty(out, force)
    configs = single_model_configs(paths)
    _check_members(paths, configs)
    out.mkdir(parents=True, exist_ok=True)
    clear_model_outputs(out)
    for stale in ("history.json", BLOCK_FILE):
        (out / stale).unlink(missing_ok=True)
    average_file([p / DECODER_FILE for p in paths], weights, out / DECODER_FILE)
    mine = ("best_epoch", "select_metric", "soup", DECODING_CHOSEN_KEY)  # not the soup's
    config = {k: v for k, v in configs[0].items() if k not in mine}
    if config.get(BLOCK_KEY):
        average_file([p / BLOCK_FILE for p in paths], weights, out / BLOCK_FILE)
        config[BLOCK_KEY] = {**config[BLOCK_KEY], "sha256": sha256_file(out / BLOCK_FILE)}
    config.update(
        name=out.name,
        soup={
            "members": [
                {"name": p.name, "weight": w, "sha256": weights_fingerprint(p)}
                for p, w in zip(paths, weights, strict=True)
            ],
            **({"greedy": greedy} if greedy else {}),
        },
        git_commit=commit,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    shutil.copyfile(paths[0] / "vocab.json", out / "vocab.json")
    history = member_histories(paths)
    if history:
        atomic_write_json(out / "history.json", history)
    atomic_write_json(out / "config.json", config)
    write_records(out, [], config)
    return config


def greedy_soup(
    out: Path,
    members: Sequence[str],
    score: Callable[[Path], float],
    weights: Sequence[float] | None = None,
    *,
    label: str = "score",
    discard: Callable[[Path], None] | None = None,
    commit: str | None = None,
    force: bool = False,
) -> tuple[dict | None, list[dict]]:
    """The greedy soup of ``members`` (Wortsman et al. 2022): each is scored alone by ``score``
    (higher is better, on held-out data), then, best first, each joins the soup if the soup with
    it scores at least as high as the soup without it. A member keeps its relative weight among
    those kept (``weights``; equal by default), so a soup given as a member with weight 4 counts
    as its four members.

    Candidate soups are written to ``.<out name>.greedy`` beside ``out`` (``discard(path)`` is
    called after each is scored, e.g. to drop its feature cache) and removed at the end. Writes
    the soup of the kept members to ``out`` and returns (its config, the trials); when no soup
    beats the best member alone, writes nothing and returns (None, the trials). ``label`` names
    the score in the trials (e.g. ``dev cider, beam 3``).
    """
    weights = member_weights(members, weights)
    paths = _member_paths(out, members)
    check_out_empty(out, force)  # before minutes of scoring, as are the members' checks
    _check_members(paths, single_model_configs(paths))
    alone = [score(p) for p in paths]
    order = sorted(range(len(paths)), key=lambda i: -alone[i])  # stable: ties keep the order
    kept, best = [order[0]], alone[order[0]]
    first = paths[order[0]].name
    trials = [{"member": first, "alone": alone[order[0]], "soup": best, "kept": True}]
    trial = out.parent / f".{out.name}.greedy"
    try:
        for i in order[1:]:
            cand = [*kept, i]
            make_soup(trial, [str(paths[j]) for j in cand], [weights[j] for j in cand], force=True)
            with_it = score(trial)
            if discard is not None:
                discard(trial)
            keep = with_it >= best
            trials.append(
                {"member": paths[i].name, "alone": alone[i], "soup": with_it, "kept": keep}
            )
            if keep:
                kept, best = cand, with_it
    finally:
        shutil.rmtree(trial, ignore_errors=True)
    if len(kept) == 1:
        return None, trials
    record = {"score": label, "trials": trials}
    members, shares = [str(paths[j]) for j in kept], [weights[j] for j in kept]
    cfg = make_soup(out, members, shares, commit=commit, force=force, greedy=record)
    return cfg, trials
