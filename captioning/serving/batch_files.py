"""The files of a batch run: its input list, its Parquet rows, and what resuming reads back.

Inputs are a folder (searched recursively), a text file of paths, or a Parquet/CSV file with a
``path`` column. The output folder holds Parquet shards of ``ROW_FIELDS`` rows; a shard a killed
run left half-written is set aside as ``_partial-NAME`` so its paths are captioned again. A run
locks its output folder (``lock_out``), so that no two runs, nor a run and what is left of a
killed one, write into it at once.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from captioning.data.images import iter_image_files

if TYPE_CHECKING:  # pyarrow (with Ray Data) is imported only by the functions that need it
    import pyarrow as pa

ROW_FIELDS = (
    "path",
    "caption",
    "nbest",  # JSON list of {"caption", "logprob"}, best first
    "logprob",
    "model",
    "bundle_sha256",
    "runtime",
    "precision",
    "decoding",  # JSON of the DecodeConfig used
    "error",  # None, or why the image has no caption
)
PARTIAL_PREFIX = "_partial-"  # pyarrow's dataset readers ignore files starting with "_"
RESUME_COLUMNS = ["path", "model", "bundle_sha256", "decoding", "error"]
LOCK_WAIT_S = 120.0  # how long a run waits for another run's lock on its output folder
LOCK_POLL_S = 0.2


def row_schema() -> pa.Schema:
    """The Parquet schema of the output rows (``ROW_FIELDS``)."""
    import pyarrow as pa

    types = {"logprob": pa.float64()}
    return pa.schema([(k, types.get(k, pa.string())) for k in ROW_FIELDS])


def read_inputs(source: str | Path) -> list[str]:
    """Absolute image paths from a folder (recursive), a text file, or Parquet/CSV ``path``."""
    src = Path(source)
    if src.is_dir():
        paths = [str(p) for p in iter_image_files([src])]
        if not paths:
            raise FileNotFoundError(f"{src}: no image files in this folder")
    elif not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    elif src.suffix.lower() in (".parquet", ".csv"):
        paths = _path_column(src)
    else:
        lines = src.read_text(encoding="utf-8").splitlines()
        paths = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    out, seen = [], set()
    for p in paths:  # absolute (Ray workers have another cwd), first occurrence kept
        ap = os.path.abspath(os.path.expanduser(p))
        if ap not in seen:
            seen.add(ap)
            out.append(ap)
    if not out:
        raise ValueError(f"{src}: lists no paths")
    return out


def _path_column(src: Path) -> list[str]:
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(src) if src.suffix.lower() == ".parquet" else pcsv.read_csv(src)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise ValueError(f"{src}: cannot read it ({e})") from None
    if "path" not in table.column_names:
        raise ValueError(f"{src}: needs a 'path' column (has {', '.join(table.column_names)})")
    return [str(p) for p in table.column("path").to_pylist() if p]


def lock_out(out: Path, wait_s: float = LOCK_WAIT_S) -> int:
    """Make ``out`` if needed and lock it for this run: an open descriptor of the folder that
    holds an exclusive ``flock``, released when every process holding it has closed it.

    The lock is held by the driver and by the reaper of its local Ray, so it is free once no
    process of the run is left, however the run ended. A run that finds it held waits up to
    ``wait_s`` (saying so once on stderr), then stops with a message. Where folders cannot be
    locked (no ``fcntl``, or a filesystem that refuses), the run goes on without the lock.
    """
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))  # close-on-exec
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return fd
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise RuntimeError(
                    f"another batch run is writing into {out}, or the processes of a killed "
                    f"one are still stopping ({wait_s:g} s waited): let it end, or use another "
                    "--out"
                ) from None
            if not told:
                print(
                    f"waiting: another batch run into {out}, or what is left of a killed one, "
                    "holds its lock",
                    file=sys.stderr,
                )
                told = True
            time.sleep(LOCK_POLL_S)
        except OSError:  # this filesystem locks no folders
            return fd


def existing_rows(out: Path) -> tuple[list[dict], list[str]]:
    """Rows already in ``out`` (``RESUME_COLUMNS``), and the shards set aside.

    A shard that cannot be read (a run killed while writing it) is renamed ``_partial-NAME`` so
    that its paths are captioned again and no reader counts it.
    """
    import pyarrow.parquet as pq

    rows, aside = [], []
    if not out.is_dir():
        return rows, aside
    for shard in sorted(out.glob("*.parquet")):
        if shard.name.startswith(("_", ".")):
            continue
        try:
            rows.extend(pq.read_table(shard, columns=RESUME_COLUMNS).to_pylist())
        except Exception:  # truncated or foreign file
            target = shard.with_name(PARTIAL_PREFIX + shard.name)
            shard.rename(target)
            aside.append(str(target))
    return rows, aside


def check_compatible(rows: list[dict], model: str, sha: str, decoding: str, out: Path) -> None:
    """Refuse to mix captions of another bundle or other decoding settings in one ``out``."""
    for r in rows[:1] + rows[-1:]:
        if r["bundle_sha256"] != sha or r["decoding"] != decoding:
            raise ValueError(
                f"{out} holds captions by {r['model']} (bundle sha256 {r['bundle_sha256'][:12]}…, "
                f"decoding {r['decoding']}); this run is {model} ({sha[:12]}…, {decoding}): "
                "use another --out"
            )


def shard_names(out: Path) -> set[str]:
    """The names of the Parquet files in ``out`` (none when it does not exist)."""
    return {p.name for p in out.glob("*.parquet")} if out.is_dir() else set()


def new_shards(out: Path, before: set[str]) -> list[tuple[float, int]]:
    """(mtime, rows) of each shard in ``out`` not named in ``before``."""
    import pyarrow.parquet as pq

    return [
        (p.stat().st_mtime, pq.ParquetFile(p).metadata.num_rows)
        for p in out.glob("*.parquet")
        if p.name not in before and not p.name.startswith(("_", "."))
    ]


def steady_rate(shards: list[tuple[float, int]], actors: int = 1) -> float | None:
    """Images/s after each actor's first shard: ``shards`` = (mtime, rows).

    The first ``actors`` shards (each actor's first, written about when its start-up and model
    load end) are not counted, and the clock starts at the last of them (like ``caption``'s loop
    rate, which starts after its model is loaded). Two actors write their first shards at about
    the same moment, so timing from the very first shard would divide by almost nothing. None
    when no shard comes after those.
    """
    if len(shards) <= actors:
        return None
    shards = sorted(shards)
    span = shards[-1][0] - shards[actors - 1][0]
    return round(sum(n for _, n in shards[actors:]) / span, 2) if span > 0 else None
