"""A bundle's ``bench.json`` (written by ``python -m captioning bench --save``), read back.

``bench.json`` holds the headline runtime at its top level (``runtime``, ``precision``, ``beams``,
``throughput_img_s``) and every runtime measured under ``runtimes``; each runtime's ``beams``
maps a beam size ("1", "3", "5") to the p50/p90 milliseconds of each stage (``encode_ms``,
``decode_ms``, ``total_ms``). This module is the one place that parses it: for the latency table
of ``python -m captioning models --latency`` and for the dashboard's latency table.
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


def read_bench(path: Path) -> dict | None:
    """A bundle's ``bench.json``, or None when absent or unreadable."""
    try:
        data = read_json(path / "bench.json")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def stage_ms(runtime: dict, beam: int | str, stage: str, quantile: str = "p50") -> float | None:
    """``runtime["beams"][beam][stage][quantile]`` as a float (None when not measured).

    ``runtime`` is one runtime's entry of ``bench.json`` (or the file itself: its headline).
    """
    try:
        return float(runtime["beams"][str(beam)][stage][quantile])
    except (KeyError, TypeError, ValueError):
        return None


@dataclass(frozen=True)
class BenchSummary:
    """The headline runtime of a bundle's ``bench.json``: per image at batch 1, and a batch rate.

    ``total_ms`` maps each of ``BENCH_BEAMS`` to its (p50, p90) bytes -> caption milliseconds;
    ``encode_p50`` and ``decode_p50`` are at ``MIDDLE_BEAM`` (else the first beam measured).
    """

    runtime: str
    precision: str
    total_ms: dict[int, tuple[float | None, float | None]] = field(default_factory=dict)
    encode_p50: float | None = None
    decode_p50: float | None = None
    images_per_s: float | None = None


def bench_summary(bundle: BundleInfo) -> BenchSummary | None:
    """The bundle's benchmark at a glance, or None when it has no readable ``bench.json``."""
    bench = read_bench(bundle.path)
    if bench is None:
        return None
    beams = bench.get("beams") if isinstance(bench.get("beams"), dict) else {}
    middle = MIDDLE_BEAM if str(MIDDLE_BEAM) in beams else next(iter(beams), MIDDLE_BEAM)
    rate = bench.get("throughput_img_s")
    return BenchSummary(
        runtime=str(bench.get("runtime", DEFAULT_RUNTIME)),
        precision=str(bench.get("precision", "?")),
        total_ms={
            b: (stage_ms(bench, b, "total_ms"), stage_ms(bench, b, "total_ms", "p90"))
            for b in BENCH_BEAMS
        },
        encode_p50=stage_ms(bench, middle, "encode_ms"),
        decode_p50=stage_ms(bench, middle, "decode_ms"),
        images_per_s=float(rate) if isinstance(rate, int | float) else None,
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


def _machine(bench: dict) -> str:
    """ "Intel(R) Xeon(R) Processor (amx_bf16, avx512_bf16)" from a bench record's CPU fields."""
    cpu = bench.get("cpu_model") if isinstance(bench.get("cpu_model"), dict) else {}
    if not cpu:  # a record without cpu_model names only the architecture ("x86_64")
        return f"{bench.get('cpu') or '?'} (CPU model not recorded)"
    model = cpu.get("model") or "?"
    flags = cpu.get("bf16_flags")
    return f"{model} ({', '.join(flags) or 'no native bf16'})" if flags is not None else model


def latency_markdown(bundles: list[BundleInfo]) -> str:
    """One table per CPU (and thread count) that measured a ``bench.json`` (`bench --save`): a row
    per bundle and runtime with batch-1 p50s of encode, decode and JPEG bytes -> caption at beams
    1/3/5, and the folder rate. Figures compare only within one table."""
    head = [
        "model",
        "runtime",
        "encode p50 ms",
        "decode p50 ms, beam 1 / 3 / 5",
        "total p50 ms, beam 1 / 3 / 5",
        "folder images/s",
    ]
    tables: dict[str, list[str]] = {}
    for b in bundles:
        bench = read_bench(b.path)
        if not bench:
            continue
        where = f"{_machine(bench)}, {bench.get('threads', '?')} threads"
        rows = tables.setdefault(where, [])
        runtimes = bench.get("runtimes") or {bench.get("runtime", DEFAULT_RUNTIME): bench}
        for name, rt in runtimes.items():
            decode = " / ".join(_p50(rt, k, "decode_ms") for k in BENCH_BEAMS)
            total = " / ".join(_p50(rt, k, "total_ms") for k in BENCH_BEAMS)
            rows.append(
                f"| {b.name} | {name} {rt.get('precision', '')} "
                f"| {_p50(rt, MIDDLE_BEAM, 'encode_ms')} "
                f"| {decode} | {total} | {_folder_cell(bench, rt)} |"
            )
    header = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    blocks = ["\n".join([f"**{where}**", "", *header, *rows]) for where, rows in tables.items()]
    return "\n\n".join(blocks)
