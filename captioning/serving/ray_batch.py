"""Batch captioning on Ray Data: paths -> decode (tasks) -> an actor pool of Captioners -> Parquet.

``run_batch(BatchConfig(model, input, out))`` captions every image of ``input`` (a folder, a text
file of paths, or a Parquet/CSV file with a ``path`` column) into Parquet shards in ``out``, one
row per image (``batch_files.ROW_FIELDS``). Unreadable files become rows whose ``error`` names
the cause. Re-running skips the paths already in ``out``; shards left half-written by a killed
run are set aside (renamed ``_partial-*``) and their paths captioned again, so no path gets two
rows.

Without an address a local Ray is started on this machine's cores; ``address="auto"``,
``"HOST:PORT"`` or ``"ray://host:10001"`` joins a cluster, where every node needs this package
installed and the input files and ``out`` at the same paths (a shared filesystem). An actor loads
the bundle from the path the driver resolved when its node holds the same files there, and
otherwise from a copy of them that the driver ships through Ray's object store. A job stops with
a message when nodes leave and the rest of the cluster cannot hold its actor pool.

The console shows one progress bar (images done, counted by a ``Tally`` actor) and Ray's
errors; ``verbose`` brings back Ray's own log lines, warnings and progress bars
(``ray_cluster.ray_console``). A local Ray runs in a temp dir of its own, watched by a reaper
process (``serving.reaper``): however the driver ends, even by SIGKILL, no process of that Ray
outlives it by more than a few seconds. The output folder is locked for the run
(``batch_files.lock_out``), and the reaper holds the lock until it is done, so a re-run right
after a kill waits for the killed run's processes instead of racing them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from captioning.data.images import ImageLoadError
from captioning.inference.captioner import dedicate_cores
from captioning.serving.batch_files import (
    check_compatible,
    existing_rows,
    lock_out,
    new_shards,
    read_inputs,
    row_schema,
    shard_names,
    steady_rate,
)
from captioning.serving.loading import load_captioner
from captioning.serving.ray_bundle import bundle_files, bundle_sha256, local_bundle
from captioning.serving.ray_cluster import NodeWatch, actor_nodes, ray_console, ray_job

ACTOR_CPU_SHARE = 0.5  # of the cluster's CPUs reserved for actors; read/write tasks get the rest
READ_TASK_CPUS = 0.25
THREADS_PER_WORKER = 1  # the default pool: one actor per this many CPUs...
ACTOR_MEMORY = 1.5 * 2**30  # ...and per this much of the cluster's memory (an actor peaks ~1.2 GB)
BATCH_SIZE = 16
PROGRESS_POLL_S = 0.5  # how often the driver's progress bar asks the tally


@dataclass
class BatchConfig:
    model: str
    input: str
    out: str
    address: str | None = None  # None: a local Ray on this machine's cores
    workers: int | None = None  # actors; None: one per CPU of the cluster (memory permitting)
    beam: int | None = None  # None: the bundle's default
    overrides: dict = field(default_factory=dict)  # other DecodeConfig fields, e.g. length_alpha
    batch_size: int = BATCH_SIZE
    precision: str = "auto"
    runtime: str = "auto"
    device: str = "auto"  # auto | cpu | cuda, resolved on the driver (core.machine)
    progress: bool = True  # a progress bar on stderr
    verbose: bool = False  # Ray's INFO lines, warnings and Ray Data's own progress bars

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")
        if self.beam is not None and self.beam < 1:
            raise ValueError(f"--beam must be at least 1, got {self.beam}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")


@dataclass
class PoolPlan:
    """How the actor pool is sized from the cluster's CPUs."""

    cluster_cpus: float
    actors: int
    cpus_per_actor: float  # what Ray reserves for each actor
    threads_per_actor: int  # torch threads inside each actor


@dataclass
class BatchReport:
    out: str
    inputs: int
    already_done: int
    captioned: int
    errors: int
    set_aside: list[str] = field(default_factory=list)  # half-written shards renamed
    seconds: float = 0.0  # the Ray Data pipeline, start-up excluded
    startup_seconds: float = 0.0  # Ray start and bundle checks
    plan: dict | None = None
    steady_images_per_s: float | None = None  # after the first shard: actor start-up excluded
    nodes: list[dict] | None = None  # per node of the cluster: its caption actors (actor_nodes)

    @property
    def images_per_s(self) -> float | None:
        return round(self.captioned / self.seconds, 2) if self.captioned and self.seconds else None

    def to_dict(self) -> dict:
        return {**asdict(self), "images_per_s": self.images_per_s}


@dataclass
class BatchJob:
    """What the driver resolved before starting Ray: the bundle, its digest, the decoding."""

    bundle: Path
    sha256: str
    decoding: dict  # every DecodeConfig field
    device: str

    @property
    def decoding_json(self) -> str:
        """The decoding as rows record it."""
        return json.dumps(self.decoding, sort_keys=True)


def gpu_share(resources: dict, actors: int) -> dict:
    """CUDA-only: each actor's share of the cluster's GPUs, as Ray resource arguments."""
    gpus = resources.get("GPU", 0)
    if not gpus:
        raise RuntimeError("--device cuda: the Ray cluster has no GPU; use --device cpu")
    return {"num_gpus": min(1.0, gpus / actors)}


def plan_pool(
    cluster_cpus: float, workers: int | None = None, cluster_memory: float | None = None
) -> PoolPlan:
    """Size the actor pool from the cluster's CPUs (and memory, when given in bytes).

    By default one single-thread actor per CPU, as many as ``ACTOR_MEMORY`` each allows: on 2
    cores two such actors caption 15–20% faster than one actor with two threads (docs/scaling.md),
    since the runtime never pins two processes to one core (``core.machine.pin_threads``).
    Actors get ``ACTOR_CPU_SHARE`` of the CPUs in Ray's accounting; the rest stays free for the
    read and write tasks: with 2 CPUs, 2 actors at 1 CPU each starve the read tasks and the
    pipeline stalls, while at 0.5 CPU each it runs. Torch threads are the real cores: the
    cluster's CPUs divided among the actors.
    """
    cpus = max(float(cluster_cpus), 1.0)
    actors = workers or max(1, int(cpus) // THREADS_PER_WORKER)
    if not workers and cluster_memory:
        actors = max(1, min(actors, int(cluster_memory // ACTOR_MEMORY)))
    return PoolPlan(
        cluster_cpus=cpus,
        actors=actors,
        cpus_per_actor=round(cpus * ACTOR_CPU_SHARE / actors, 3),
        threads_per_actor=max(1, int(cpus) // actors),
    )


# ---------------------------------------------------------------- Ray Data tasks and actors


def load_files(batch: Any) -> Any:
    """Ray Data task: ``path`` -> ``path, rgb, height, width, error`` (a pyarrow Table).

    Reads and decodes each image with the captioning input's loader (``runtime.pixels.load_rgb``:
    decode, orient, reduce in uint8), so decoding runs in these tasks while the actors caption.
    ``rgb`` holds the reduced uint8 [height, width, 3] image's bytes (a quarter of the float
    pixels; the actor finishes ``preprocess``), or nothing when ``error`` says why the file is
    unusable. Never raises for a bad image.
    """
    import pyarrow as pa

    from captioning.runtime.pixels import load_rgb

    paths = [str(p) for p in batch.column("path").to_pylist()]
    cols: dict[str, list] = {"path": paths, "rgb": [], "height": [], "width": [], "error": []}
    for p in paths:
        try:
            rgb = load_rgb(p)  # [H, W, 3] uint8
            cols["rgb"].append(rgb.tobytes())
            cols["height"].append(rgb.shape[0])
            cols["width"].append(rgb.shape[1])
            cols["error"].append(None)
        except ImageLoadError as e:
            for k, v in (("rgb", b""), ("height", 0), ("width", 0), ("error", str(e))):
                cols[k].append(v)
    return pa.table(cols, schema=loaded_schema())


def loaded_schema() -> Any:
    """The schema of ``load_files``' output."""
    import pyarrow as pa

    return pa.schema(
        [
            ("path", pa.string()),
            ("rgb", pa.binary()),
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("error", pa.string()),
        ]
    )


class Tally:
    """Ray actor: how many images the caption actors have finished (the driver's progress bar)."""

    def __init__(self) -> None:
        self.images = 0

    def add(self, n: int) -> None:
        self.images += n

    def count(self) -> int:
        return self.images


class ImageBar:
    """The driver's progress bar (tqdm on stderr): images done of ``total``, polled from a
    ``Tally`` every ``PROGRESS_POLL_S`` while the pipeline runs."""

    def __init__(self, tally: Any, total: int, done: int, desc: str) -> None:
        from tqdm.auto import tqdm

        self.tally = tally
        self.todo = total - done
        self.bar = tqdm(total=total, initial=done, unit="img", desc=desc, dynamic_ncols=True)
        self.shown = 0  # images of this run on the bar
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="image-bar", daemon=True)

    def __enter__(self) -> ImageBar:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.bar.close()

    def show(self, images: int) -> None:
        """Move the bar to ``images`` of this run (an actor restarted on another node may count
        a batch twice: never past the run's total)."""
        images = min(images, self.todo)
        if images > self.shown:
            self.bar.update(images - self.shown)
            self.shown = images

    def _poll(self) -> None:
        import ray

        while not self._done.wait(PROGRESS_POLL_S):
            with contextlib.suppress(Exception):  # a failed poll: the next one may answer
                self.show(ray.get(self.tally.count.remote(), timeout=PROGRESS_POLL_S * 10))


class CaptionActor:
    """Ray Data callable class: loads the Captioner once, captions batches of decoded images
    (and adds each batch's size to ``tally``, a ``Tally`` actor, when given)."""

    def __init__(
        self,
        bundle: str,
        sha256: str,
        precision: str,
        runtime: str,
        decoding: dict,
        threads: int,
        device: str = "cpu",
        shipped: list | None = None,
        tally: Any = None,
    ) -> None:
        import torch

        torch.set_num_threads(max(1, min(threads, os.cpu_count() or threads)))
        self.bundle = local_bundle(bundle, sha256, shipped)
        self.cap = load_captioner(self.bundle, precision, runtime, device)
        dedicate_cores(self.cap)  # an actor's process runs only this captioner
        self.decoding = decoding  # every DecodeConfig field, fixed by the driver
        self.tally = tally
        cfg = self.cap.decode_config(**decoding)
        self.const = {
            "model": self.cap.name,
            "bundle_sha256": sha256,
            "runtime": self.cap.runtime,
            "precision": self.cap.precision_label,
            "decoding": json.dumps(asdict(cfg), sort_keys=True),
        }

    def __call__(self, batch: Any) -> Any:
        """A ``load_files`` Table -> a Table of ``row_schema()``."""
        import numpy as np
        import pyarrow as pa
        import torch

        from captioning.models.encoders import preprocess

        paths = batch.column("path").to_pylist()
        errors = batch.column("error").to_pylist()
        rows = [
            {"path": p, "caption": None, "nbest": None, "logprob": None, "error": e, **self.const}
            for p, e in zip(paths, errors, strict=True)
        ]
        ok = [i for i, e in enumerate(errors) if e is None]
        if ok:
            blobs, hs, ws = (batch.column(c).to_pylist() for c in ("rgb", "height", "width"))
            rgbs = [np.frombuffer(blobs[i], np.uint8).reshape(hs[i], ws[i], 3) for i in ok]
            x = torch.stack([preprocess(rgb) for rgb in rgbs])  # [n, 3, 224, 224]
            results = self.cap.caption_pixels(x, **self.decoding)
            for i, res in zip(ok, results, strict=True):
                nbest = [{"caption": t, "logprob": round(s, 4)} for t, s in res.nbest]
                rows[i].update(caption=res.text, logprob=res.score, nbest=json.dumps(nbest))
        table = pa.Table.from_pylist(rows, schema=row_schema())
        if self.tally is not None:
            self.tally.add.remote(len(rows))  # no reply awaited
        return table


# ---------------------------------------------------------------- the job


def resolve_job(cfg: BatchConfig) -> BatchJob:
    """Check the device and the bundle, and fix the decoding, before any Ray starts."""
    from captioning.bundle.catalog import resolve_bundle
    from captioning.bundle.ensemble import check_bundle
    from captioning.bundle.format import bundle_decoding
    from captioning.core.machine import resolve_device

    device = resolve_device(cfg.device)  # fails early when cuda is asked for but absent
    bundle = resolve_bundle(cfg.model).resolve()
    bcfg = check_bundle(bundle)  # fails early on a broken bundle
    dec = asdict(bundle_decoding(bcfg, cfg.beam, **cfg.overrides))
    return BatchJob(bundle, bundle_sha256(bundle), dec, device)


def _caption_paths(
    cfg: BatchConfig, job: BatchJob, plan: PoolPlan, todo: list[str], out: Path, tally: Any = None
) -> None:
    """The Ray Data pipeline: ``todo`` -> ``load_files`` -> ``CaptionActor`` -> ``out``."""
    import ray

    n_blocks = max(plan.actors, math.ceil(len(todo) / (cfg.batch_size * 8)))
    ds = ray.data.from_items([{"path": p} for p in todo], override_num_blocks=n_blocks)
    ds = ds.map_batches(
        load_files, batch_size=cfg.batch_size, batch_format="pyarrow", num_cpus=READ_TASK_CPUS
    )
    model = (str(job.bundle), job.sha256, cfg.precision, cfg.runtime, job.decoding)
    shipped = [ray.put(bundle_files(job.bundle))]  # in a list: fetched only by nodes without it
    actor_args = (*model, plan.threads_per_actor, job.device, shipped, tally)
    gpus = gpu_share(ray.cluster_resources(), plan.actors) if job.device != "cpu" else {}
    ds = ds.map_batches(
        CaptionActor,
        fn_constructor_args=actor_args,
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_cpus=plan.cpus_per_actor,
        **gpus,
    )
    ds.write_parquet(str(out), ray_remote_args={"num_cpus": READ_TASK_CPUS})


def run_batch(cfg: BatchConfig) -> BatchReport:
    """Caption ``cfg.input`` into Parquet shards in ``cfg.out`` on Ray Data; resumable.

    The output folder is locked for the run (``lock_out``): a second run into it waits for
    the first, and for the processes of a killed one, to end.
    """

    t0 = time.perf_counter()
    out = Path(cfg.out).resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    job = resolve_job(cfg)
    paths = read_inputs(cfg.input)
    created = not out.exists()
    lock = lock_out(out)
    try:
        rows, aside = existing_rows(out)
        check_compatible(rows, job.bundle.name, job.sha256, job.decoding_json, out)
        done = {r["path"] for r in rows}
        todo = [p for p in paths if p not in done]
        report = BatchReport(str(out), len(paths), len(paths) - len(todo), 0, 0, aside)
        if not todo:
            report.startup_seconds = round(time.perf_counter() - t0, 2)
            return report
        before = shard_names(out)
        with ray_console(cfg.verbose, cfg.progress), ray_job(cfg.address, cfg.verbose, [lock]):
            plan = _run_pipeline(cfg, job, todo, out, report, t0)
    finally:
        os.close(lock)
        if created:  # a run that wrote nothing leaves no empty folder
            with contextlib.suppress(OSError):
                out.rmdir()
    new = [r for r in existing_rows(out)[0] if r["path"] not in done]
    report.captioned = sum(1 for r in new if r["error"] is None)
    report.errors = len(new) - report.captioned
    report.steady_images_per_s = steady_rate(new_shards(out, before), plan.actors)
    return report


def _run_pipeline(
    cfg: BatchConfig, job: BatchJob, todo: list[str], out: Path, report: BatchReport, t0: float
) -> PoolPlan:
    """Size the pool on the running Ray, caption ``todo`` into ``out``; fills ``report``'s
    plan, times and nodes."""
    import ray

    resources = ray.cluster_resources()
    plan = plan_pool(resources.get("CPU", 1.0), cfg.workers, resources.get("memory"))
    report.plan = asdict(plan)
    t1 = time.perf_counter()
    report.startup_seconds = round(t1 - t0, 2)
    watch = NodeWatch(plan.actors * plan.cpus_per_actor + READ_TASK_CPUS)
    own_bar = cfg.progress and not cfg.verbose  # verbose: Ray Data draws its own bars
    tally = ray.remote(num_cpus=0)(Tally).remote() if own_bar else None
    bar = (
        ImageBar(tally, report.inputs, report.already_done, f"caption {job.bundle.name}")
        if own_bar
        else contextlib.nullcontext()
    )
    try:
        with watch, bar:
            _caption_paths(cfg, job, plan, todo, out, tally)
            if own_bar:
                bar.show(len(todo))
    except KeyboardInterrupt:
        if not watch.lost:
            raise
        raise RuntimeError(watch.message()) from None
    finally:
        if tally is not None:
            with contextlib.suppress(Exception):  # gone with its node, or with Ray
                ray.kill(tally)
    report.seconds = round(time.perf_counter() - t1, 2)
    report.nodes = actor_nodes()
    return plan
