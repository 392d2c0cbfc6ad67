"""``card.md``: a bundle's model card, rendered from its config, history and records."""

from __future__ import annotations

from pathlib import Path

from captioning.bundle.format import DECODING_CHOSEN_KEY, BundleError, is_ensemble, tuned_block
from captioning.bundle.history import dev_beam, read_history
from captioning.bundle.records import decoding_label
from captioning.bundle.reports import (
    _cells,
    _columns,
    bundle_info,
    default_decoding,
    results,
)
from captioning.core.files import atomic_write_text
from captioning.models.metrics import METRIC_LABELS


def _trained_lines(cfg: dict, history: list) -> list[str]:
    """What one training run's card says of its data, best epoch and encoder weights."""
    best = f"- Best epoch: {cfg.get('best_epoch')} of {len(history)}; encoder weights sha256 "
    return [_data_line(cfg), best + f"`{cfg['encoder_sha256'][:16]}…`."]


def _data_line(config: dict) -> str:
    data = config.get("data")
    if not data:
        return "- Data: the data set, layout and split were not recorded with this bundle."
    sizes = data.get("images", {})
    counts = ", ".join(f"{sizes[s]} {s}" for s in ("train", "dev", "test") if s in sizes)
    beam = dev_beam(config)
    how = "greedy" if beam == 1 else f"beam {beam}"
    metric = config.get("select_metric", "dev_bleu4")  # absent: dev BLEU-4 chose
    chosen = "dev " + METRIC_LABELS.get(metric.removeprefix("dev_"), metric)
    return (
        f"- Data: {data.get('name', 'Flickr8k')}, {data['layout']} layout ({data['split']}); "
        f"{counts} images. "
        f"Trained on the train images (all captions), checkpoint chosen on {chosen} ({how})."
    )


def _model_lines(cfg: dict, history: list[dict]) -> list[str]:
    """The card's description of one trained model: encoder, decoder, data, checkpoint."""
    d = cfg["decoder_config"]
    block = tuned_block(cfg)
    how = f"with its `{block}` fine-tuned with the decoder" if block else "(frozen)"
    par = cfg["decoder"] == "inject" and d.get("inject_mode") == "par"
    kind = "`inject` (par-inject: the image beside every word)" if par else f"`{cfg['decoder']}`"
    article = "an" if cfg["decoder"][:1] in "aeiou" else "a"
    return [
        f"An image captioner: the `{cfg['encoder']}` ImageNet encoder {how} and {article} "
        f"{kind} LSTM decoder (hidden {d['hidden_dim']}, embedding {d['embed_dim']}, "
        f"dropout {d['dropout']}) with a {d['vocab_size']}-word vocabulary.",
        "",
        *(_soup_lines(cfg) if cfg.get("soup") else _trained_lines(cfg, history)),
    ]


def _soup_lines(cfg: dict) -> list[str]:
    """The card's lines for a soup (``captioning.bundle.soup``): its members instead of an epoch."""
    members = ", ".join(f"`{m['name']}` ({m['weight']:g})" for m in cfg["soup"]["members"])
    return [
        f"- A weight-averaged soup of {members}: the weighted mean of their decoder and "
        "fine-tuned block weights; `history.json` holds their epochs.",
        _ensemble_data_line(cfg.get("data")),
        f"- Encoder weights sha256 `{cfg['encoder_sha256'][:16]}…`.",
    ]


def _ensemble_lines(cfg: dict) -> list[str]:
    """The card's description of an ensemble (``captioning.bundle.ensemble``): its members."""
    members = ", ".join(f"`{m['name']}` ({m['weight']:g})" for m in cfg["members"])
    return [
        f"An ensemble of {members}: one beam search over the weighted mean of the members' "
        "word probabilities, each member on its own encoder. It holds no weights; each member's "
        "card describes its training, and loading checks the members' sha256.",
        "",
        _ensemble_data_line(cfg.get("data")),
    ]


def _ensemble_data_line(data: dict | None) -> str:
    if not data:
        return "- Data: the data set, layout and split were not recorded with this bundle."
    return (
        f"- Data: {data.get('name', 'Flickr8k')}, {data['layout']} layout ({data['split']}); "
        "every member was trained on its train images and chosen on its dev split."
    )


def _decoding_source(cfg: dict) -> str:
    """How the default decoding was chosen, as the card says it."""
    chosen = cfg.get(DECODING_CHOSEN_KEY)
    if chosen:
        return f"chosen on {chosen} by `tune-decoding`"
    return "the built-in default, not yet chosen on dev: run `tune-decoding --apply`"


def card_markdown(path: Path) -> str:
    """``card.md``: what the model is, its data, protocol and every score recorded so far."""
    info = bundle_info(path)
    cfg = info.config
    rows = results(info)
    keys = _columns(rows)
    about = _ensemble_lines(cfg) if is_ensemble(cfg) else _model_lines(cfg, read_history(path))
    lines = [
        f"# {cfg['name']}",
        "",
        *about,
        f"- Encoder features: precision `{cfg.get('precision', 'unknown')}`, runtime "
        f"`{cfg.get('runtime', 'unknown')}`.",
        f"- Default decoding: {decoding_label(default_decoding(info))} ({_decoding_source(cfg)}).",
        "- Protocol: corpus BLEU-1..4 (nltk, all of each image's references, no smoothing), "
        "CIDEr-D, METEOR and ROUGE-L (pycocoevalcap) on lowercased, punctuation-stripped "
        "tokens; 0–100 scale.",
        "",
    ]
    if rows:
        setting = ["split", "images", "decoding", "precision", "runtime"]
        head = [*setting, *(METRIC_LABELS[k] for k in keys)]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            s = r.setting
            split = f"{s.split} (first {s.limit})" if s.limit else s.split
            mark = " (default)" if r.default else ""
            lines.append(
                f"| {split} | {r.n_images} | {decoding_label(s.decoding)}{mark} | {s.precision} "
                f"| {s.runtime} | {_cells(r.metrics, keys)} |"
            )
    else:
        lines.append("No evaluation recorded yet (`python -m captioning evaluate ... --record`).")
    lines += [
        "",
        f'Load it with `Captioner.load("{cfg["name"]}")` or '
        f"`python -m captioning caption --model {cfg['name']} IMAGE`.",
        "",
    ]
    return "\n".join(lines)


def write_card(path: Path) -> Path:
    """Render and write ``path/card.md``; returns its path."""
    try:
        text = card_markdown(path)
    except KeyError as e:
        raise BundleError(f"{path / 'config.json'} lacks {e}") from None
    atomic_write_text(path / "card.md", text)
    return path / "card.md"
