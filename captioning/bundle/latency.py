"""A bundle's ``bench.json`` (written by ``python -m captioning bench --save``), read back.

``bench.json`` holds the headline setting at its top level (``runtime``, ``precision``,
``beams``, ``throughput_img_s``: the setting ``auto`` picks) and every setting measured under
``runtimes``; each setting's ``beams`` maps a beam size ("1", "3", "5") to the p50/p90
milliseconds of each stage (``encode_ms``, ``decode_ms``, ``total_ms``). In version 3
``runtimes`` is keyed by setting ("torch bf16", "openvino int8"), each entry flags ``auto`` and
carries ``vs_yardstick`` (beam -> total p50 / the yardstick's p50), and ``yardstick`` holds the
p50/p90 of a torchvision ResNet50 fp32 forward at batch 1 timed in the same run. Version 2 keys
``runtimes`` by runtime and has no yardstick. This module is the one place that parses it: for
the latency table of ``python -m captioning models --latency`` and for the dashboard's latency
table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from captioning.bundle.catalog import BundleInfo
from captioning.bundle.format import DEFAULT_RUNTIME, bundle_decoding
from captioning.core.files import read_json
from captioning.models.metrics import MISSING

BENCH_BEAMS = (1, 3, 5)  # the beams a bench measures (and the tables show)
MIDDLE_BEAM = 3  # the beam whose encode and decode times stand for the bundle
YARDSTICK_HEAD = f"× yardstick at beam {MIDDLE_BEAM}"


def read_bench(path: Path) -> dict | None:
    """A bundle's ``bench.json``, or None when absent or unreadable."""
    try:
        data = read_json(path / "bench.json")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def stage_ms(runtime: dict, beam: int | str, stage: str, quantile: str = "p50") -> float | None:
    """``runtime["beams"][beam][stage][quantile]`` as a float (None when not measured).

    ``runtime`` is one setting's entry of ``bench.json`` (or the file itself: its headline).
    """
    try:
        return float(runtime["beams"][str(beam)][stage][quantile])
    except (KeyError, TypeError, ValueError):
        return None


def _number(x: object) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def yardstick_p50(bench: dict) -> float | None:
    """The yardstick's p50 ms of a bench record (None before version 3)."""
    ys = bench.get("yardstick")
    return _number(ys.get("p50_ms")) if isinstance(ys, dict) else None


def bench_settings(bench: dict) -> dict[str, dict]:
    """Every setting a bench record measured, by name: version 3's ``runtimes`` (a dict by
    setting, or a list of entries naming theirs), version 2's (by runtime), or the record
    itself when it has none."""
    runtimes = bench.get("runtimes")
    if isinstance(runtimes, list):
        return {
            str(r.get("setting") or r.get("runtime") or i): r
            for i, r in enumerate(runtimes)
            if isinstance(r, dict)
        }
    if isinstance(runtimes, dict) and runtimes:
        return {str(k): r for k, r in runtimes.items() if isinstance(r, dict)}
    return {str(bench.get("runtime", DEFAULT_RUNTIME)): bench}


def setting_label(name: str, entry: dict) -> str:
    """A row's name: what ran and at which precision, e.g. "openvino bf16+cl (auto)"; an entry
    without ``runtime`` is named by its key."""
    label = f"{entry.get('runtime') or name} {entry.get('precision', '')}".strip()
    return label + " (auto)" if entry.get("auto") is True else label


def vs_yardstick(bench: dict, entry: dict, beam: int | str = MIDDLE_BEAM) -> float | None:
    """An entry's total p50 at ``beam`` over the yardstick's p50 (its ``vs_yardstick`` when
    recorded), or None without a yardstick."""
    recorded = entry.get("vs_yardstick")
    if isinstance(recorded, dict) and _number(recorded.get(str(beam))) is not None:
        return float(recorded[str(beam)])
    total, ys = stage_ms(entry, beam, "total_ms"), yardstick_p50(bench)
    return round(total / ys, 2) if total is not None and ys else None


@dataclass(frozen=True)
class BenchSummary:
    """The headline setting of a bundle's ``bench.json``: per image at batch 1, and a batch rate.

    ``total_ms`` maps each of ``BENCH_BEAMS`` to its (p50, p90) bytes -> caption milliseconds;
    ``encode_p50``, ``decode_p50`` and ``vs_yardstick`` are at ``MIDDLE_BEAM`` (else the first
    beam measured); ``yardstick_p50`` and ``vs_yardstick`` are None before version 3.
    """

    runtime: str
    precision: str
    total_ms: dict[int, tuple[float | None, float | None]] = field(default_factory=dict)
    encode_p50: float | None = None
    decode_p50: float | None = None
    images_per_s: float | None = None
    yardstick_p50: float | None = None
    vs_yardstick: float | None = None


def bench_summary(bundle: BundleInfo) -> BenchSummary | None:
    """The bundle's benchmark at a glance, or None when it has no readable ``bench.json``."""
    bench = read_bench(bundle.path)
    if bench is None:
        return None
    beams = bench.get("beams") if isinstance(bench.get("beams"), dict) else {}
    middle = MIDDLE_BEAM if str(MIDDLE_BEAM) in beams else next(iter(beams), MIDDLE_BEAM)
    return BenchSummary(
        runtime=str(bench.get("runtime", DEFAULT_RUNTIME)),
        precision=str(bench.get("precision", "?")),
        total_ms={
            b: (stage_ms(bench, b, "total_ms"), stage_ms(bench, b, "total_ms", "p90"))
            for b in BENCH_BEAMS
        },
        encode_p50=stage_ms(bench, middle, "encode_ms"),
        decode_p50=stage_ms(bench, middle, "decode_ms"),
        images_per_s=_number(bench.get("throughput_img_s")),
        yardstick_p50=yardstick_p50(bench),
        vs_yardstick=vs_yardstick(bench, {"beams": beams}, middle),
    )


def default_latency(bundle: BundleInfo) -> tuple[float, str] | None:
    """(decode p50 ms at the default beam, runtime) from ``bench.json``, when it has that beam."""
    bench = read_bench(bundle.path)
    if bench is None:
        return None
    ms = stage_ms(bench, bundle_decoding(bundle.config).beam_size, "decode_ms")
    return None if ms is None else (ms, str(bench.get("runtime", DEFAULT_RUNTIME)))


def _p50(runtime: dict, beam: int | str, stage: str) -> str:
    ms = stage_ms(runtime, beam, stage)
    return MISSING if ms is None else f"{ms:.1f}"


def _folder_cell(bench: dict, runtime: dict) -> str:
    folder = runtime.get("folder") or {}
    if folder.get("images_per_s") is None:
        return MISSING
    where = "samples" if "samples" in str(bench.get("folder", "")) else "images"
    beam = bench.get("throughput_beam", "?")
    return f"{float(folder['images_per_s']):.1f} ({folder.get('images', '?')} {where}, beam {beam})"


def machine_label(bench: dict) -> str:
    """ "Intel(R) Xeon(R) Processor (amx_bf16, avx512_bf16)" from a bench record's CPU fields."""
    cpu = bench.get("cpu_model") if isinstance(bench.get("cpu_model"), dict) else {}
    if not cpu:  # a record without cpu_model names only the architecture ("x86_64")
        return f"{bench.get('cpu') or '?'} (CPU model not recorded)"
    model = cpu.get("model") or "?"
    flags = cpu.get("bf16_flags")
    return f"{model} ({', '.join(flags) or 'no native bf16'})" if flags is not None else model


LATENCY_HEAD = (
    "model",
    "runtime",
    "encode p50 ms",
    "decode p50 ms, beam 1 / 3 / 5",
    "total p50 ms, beam 1 / 3 / 5",
    "folder images/s",
)


def _rows(b: BundleInfo, bench: dict, yardstick: bool) -> list[str]:
    """A markdown row per setting of ``bench`` (with the ratio to the yardstick if asked)."""
    rows = []
    for name, rt in bench_settings(bench).items():
        decode = " / ".join(_p50(rt, k, "decode_ms") for k in BENCH_BEAMS)
        total = " / ".join(_p50(rt, k, "total_ms") for k in BENCH_BEAMS)
        cells = [
            b.name,
            setting_label(name, rt),
            _p50(rt, MIDDLE_BEAM, "encode_ms"),
            decode,
            total,
            _folder_cell(bench, rt),
        ]
        if yardstick:
            vs = vs_yardstick(bench, rt)
            cells.append(MISSING if vs is None else f"{vs:.2f}")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _cpu_table(where: str, records: list[tuple[BundleInfo, dict]]) -> str:
    """One CPU's table; when a record has a yardstick, its column and a line naming its p50s."""
    yards = [(b.name, ms) for b, bench in records if (ms := yardstick_p50(bench)) is not None]
    head = [*LATENCY_HEAD, YARDSTICK_HEAD] if yards else list(LATENCY_HEAD)
    lines = [f"**{where}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [row for b, bench in records for row in _rows(b, bench, bool(yards))]
    if yards:
        each = ", ".join(f"{name} {ms:.1f} ms" for name, ms in yards)
        lines += ["", f"Yardstick (torchvision ResNet50 fp32, batch 1) p50 in each run: {each}."]
    return "\n".join(lines)


def latency_markdown(bundles: list[BundleInfo]) -> str:
    """One table per CPU (and thread count) that measured a ``bench.json`` (`bench --save`): a
    row per bundle and setting (the one ``auto`` picks marked) with batch-1 p50s of encode,
    decode and JPEG bytes -> caption at beams 1/3/5, the folder rate and, for records with a
    yardstick, total p50 at beam 3 over the yardstick's p50. Figures compare only within one
    table."""
    tables: dict[str, list[tuple[BundleInfo, dict]]] = {}
    for b in bundles:
        bench = read_bench(b.path)
        if bench:
            where = f"{machine_label(bench)}, {bench.get('threads', '?')} threads"
            tables.setdefault(where, []).append((b, bench))
    return "\n\n".join(_cpu_table(where, records) for where, records in tables.items())
