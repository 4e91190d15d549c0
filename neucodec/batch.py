"""Folder in -> folder out: find the files, mirror the tree, skip existing outputs, run jobs, summarise.

On the CPU the files are spread over worker processes (`jobs`), each loading the model once. On a
GPU up to `jobs` files run together in this process, sharing the model: each file's data path yields
its model calls, and the codec steps of all of them go through the GPU as one batch
(`neucodec.engine`), so the GPU sees batches, not single files, and each file still gets the codes it
would get alone; their LM coding runs as one batch on the CPU the same way.
A file that fails is reported and the rest go on; the summary says how many failed.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import multiprocessing
import os
import sys
import time
import traceback
import typing as tp
from pathlib import Path

import torch

from . import audio_io, engine, errors, pipeline
from .atomic import TMP_MARK, Terminated, raise_on_sigterm
from .errors import NeucodecError

Mode = tp.Literal["encode", "decode"]
#: Files batched together on a GPU when `-j` is not given.
GPU_FILES = 16


@dataclasses.dataclass(frozen=True)
class Job:
    source: Path
    target: Path


@dataclasses.dataclass
class Outcome:
    """The result of one job: done, skipped (output exists) or failed (one-line `error`)."""

    job: Job
    status: str  # "done" | "skipped" | "failed"
    error: str | None = None
    detail: str | None = None  # traceback, shown with -v
    seconds: float = 0.0
    bytes: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)
    damage: list[str] = dataclasses.field(default_factory=list)  # decode with salvage: each lost span, a line


@dataclasses.dataclass
class Summary:
    outcomes: list[Outcome]
    elapsed: float

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def line(self, mode: Mode) -> str:
        done, skipped, failed = self.count("done"), self.count("skipped"), self.count("failed")
        audio = sum(o.seconds for o in self.outcomes if o.status == "done")
        size = sum(o.bytes for o in self.outcomes if o.status == "done")
        parts = [f"{mode}d {done} file{'s' * (done != 1)}"]
        if done:
            parts[0] += f" ({audio:.1f} s of audio, {size:,} bytes of .ecdc)"
        if skipped:
            parts.append(f"{skipped} skipped (output exists; {errors.option('-f/--force')} to overwrite)")
        if failed:
            parts.append(f"{failed} failed")
        return ", ".join(parts) + f" in {self.elapsed:.1f} s"


# ------------------------------------------------------------------------------------------ planning
def plan(src_dir: Path, dst_dir: Path, mode: Mode, audio_ext: str = ".wav") -> list[Job]:
    """Jobs for every input under `src_dir` (recursively, sorted), mirrored under `dst_dir`.

    encode picks audio files (`audio_io.AUDIO_EXTENSIONS`) and names outputs `.ecdc`; decode picks
    `.ecdc` files and names outputs with `audio_ext`. Hidden files, temporary files and anything
    already under `dst_dir` (when it sits inside `src_dir`) are left out.
    """
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    wanted = audio_io.AUDIO_EXTENSIONS if mode == "encode" else (".ecdc",)
    out_ext = ".ecdc" if mode == "encode" else audio_ext
    dst_resolved = dst_dir.resolve()
    skip_dst = dst_resolved != src_dir.resolve() and dst_resolved.is_relative_to(src_dir.resolve())
    jobs = []
    for root, dirs, files in os.walk(src_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and not (skip_dst and (Path(root) / d).resolve() == dst_resolved))
        for name in sorted(files):
            path = Path(root) / name
            if name.startswith(".") or TMP_MARK in name or path.suffix.lower() not in wanted:
                continue
            rel = path.relative_to(src_dir)
            jobs.append(Job(path, (dst_dir / rel).with_suffix(out_ext)))
    return jobs


def collisions(jobs: list[Job]) -> dict[Path, list[Path]]:
    """Outputs that more than one input maps to (e.g. `a.wav` and `a.flac` -> `a.ecdc`)."""
    seen: dict[Path, list[Path]] = {}
    for j in jobs:
        seen.setdefault(j.target, []).append(j.source)
    return {t: s for t, s in seen.items() if len(s) > 1}


# ----------------------------------------------------------------------------------------- running
def _run_one(mode: Mode, job: Job, options: dict[str, tp.Any], progress: bool = False) -> Outcome:
    return engine.complete(_outcome(mode, job, options, progress))


def _outcome(mode: Mode, job: Job, options: dict[str, tp.Any],
             progress: bool = False) -> tp.Generator[engine.Call, None, Outcome]:
    """One job's outcome, yielding its model calls."""
    try:
        job.target.parent.mkdir(parents=True, exist_ok=True)
        calls = pipeline.encode_calls if mode == "encode" else pipeline.decode_calls
        result = yield from calls(job.source, job.target, progress=progress, **options)
        return Outcome(job, "done", seconds=result.seconds, bytes=result.bytes, notes=result.notes,
                       damage=result.damage)
    except NeucodecError as e:
        return Outcome(job, "failed", str(e), traceback.format_exc())
    except OSError as e:
        return Outcome(job, "failed", f"{e.strerror or e} ({e.filename or job.source})", traceback.format_exc())
    except Exception as e:  # noqa: BLE001 - one broken file must not stop the batch
        return Outcome(job, "failed", f"internal error {type(e).__name__}: {e}; rerun with -v and report it",
                       traceback.format_exc())


def _init_worker(threads: int, command_line: bool = False) -> None:
    torch.set_num_threads(threads)
    raise_on_sigterm()
    errors._COMMAND_LINE.set(command_line)  # messages name settings as the parent's caller gave them


def run(jobs: list[Job], mode: Mode, options: dict[str, tp.Any], *, force: bool = False, n_jobs: int = 1,
        progress: bool = True, report: tp.Callable[[Outcome], None] | None = None, batched: bool | None = None,
        max_batch_samples: int = engine.MAX_BATCH_SAMPLES) -> Summary:
    """Run the jobs; `report` is called for every finished job (in completion order).

    `options` are keyword arguments of `pipeline.encode_file`/`decode_file` (model, bandwidth, device,
    ...); they must be picklable for `n_jobs > 1`. Jobs whose output exists are skipped unless `force`.
    With `n_jobs > 1`, `batched` runs up to `n_jobs` files in this process with their codec steps
    batched across files (`neucodec.engine`, at most `max_batch_samples` samples a batch) instead
    of in `n_jobs` worker processes; None (the default) batches when the device is CUDA.
    """
    t0 = time.perf_counter()
    outcomes: list[Outcome] = []
    clash = collisions(jobs)
    todo: list[Job] = []
    for job in jobs:
        if job.target in clash and job.source != clash[job.target][0]:
            outcomes.append(Outcome(job, "failed", f"{job.source} and {clash[job.target][0]} would both write "
                                    f"{job.target}; rename one of them"))
        elif job.target.exists() and not force:
            outcomes.append(Outcome(job, "skipped"))
        else:
            todo.append(job)
    for o in outcomes:
        if report:
            report(o)
    options = dict(options, force=force)
    if batched is None:
        batched = str(options.get("device", "cpu")).startswith("cuda")
    bar = _files_bar(progress, len(todo), mode)

    def finished(o: Outcome) -> None:
        outcomes.append(o)
        _done(o, bar, report)

    try:
        if n_jobs <= 1 or len(todo) <= 1:
            for job in todo:
                finished(_run_one(mode, job, options, progress=progress))
        elif batched:  # the files share the codec of each model (`pipeline.get_codec`)
            engine.run([functools.partial(_outcome, mode, job, options) for job in todo], n_jobs, finished,
                       max_batch_samples)
        else:
            _run_parallel(todo, mode, options, n_jobs, finished)
    finally:
        if bar is not None:
            bar.close()
    return Summary(outcomes, time.perf_counter() - t0)


def _run_parallel(todo: list[Job], mode: Mode, options: dict[str, tp.Any], n_jobs: int,
                  finished: tp.Callable[[Outcome], None]) -> None:
    threads = max(1, (os.cpu_count() or 1) // n_jobs)
    ctx = multiprocessing.get_context("spawn")  # fork after torch has started threads can deadlock
    pool = cf.ProcessPoolExecutor(max_workers=min(n_jobs, len(todo)), mp_context=ctx,
                                  initializer=_init_worker, initargs=(threads, errors.in_command_line()))
    try:
        futures = {pool.submit(_run_one, mode, job, options): job for job in todo}
        for fut in cf.as_completed(futures):
            try:
                o = fut.result()
            except cf.process.BrokenProcessPool:
                o = Outcome(futures[fut], "failed", "a worker process died (out of memory?); rerun with fewer --jobs")
            finished(o)
    except (KeyboardInterrupt, Terminated):
        # workers clean their temporary files on SIGTERM (see _init_worker)
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _files_bar(enabled: bool, total: int, mode: Mode) -> tp.Any:
    if not enabled or total <= 1:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc=f"{mode}", file=sys.stderr, dynamic_ncols=True)


def _done(o: Outcome, bar: tp.Any, report: tp.Callable[[Outcome], None] | None) -> None:
    if bar is not None:
        bar.update(1)
    if report:
        if bar is not None:
            with bar.external_write_mode(file=sys.stderr):
                report(o)
        else:
            report(o)
