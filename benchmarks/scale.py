"""Scale benchmark: how ingest, reruns, validation and the loader grow with the subject count.

    .venv/bin/python benchmarks/scale.py [--sizes 100 300 1000] [--loader-slices 100000] [--cache-gb 1.0]

Ingest part (small synthetic M&Ms subjects: 32 x 32 x 4 slices x 5 frames, stored at 32 x 32;
small images are enough because the costs that grow with the store are per subject, not per
pixel). One store grows through the sizes: for each size N the ingest is rerun on a root holding
the first N subjects, which adds the subjects that are new (in this process: the executor that
isolates the driver's costs), and the benchmark reports:

* the driver's commit time and the wall time per subject of the first 100 and the last 100
  subjects added at that size (a layout whose commit rewrites the subject table grows here);
* store size and file count, the no-op rerun time (``plan_ingest`` on the finished store: discovery,
  stat checks, commit-log read) and the ``store validate`` time;
* a streaming loader epoch over the store (slices/s, peak extra memory).

Each cost is fitted as ``a * N ** b`` over the sizes (``b`` about 1: linear in N; about 0:
constant per subject). Realistic per-subject stage costs (``--stage-subjects`` full-size phantom
subjects through the same code with 2 Ray workers) and the fits give the projection for 50,000
subjects on a 16-worker cluster.

Loader part (``--loader-slices``, 256 x 256 slices, the store of ``benchmarks/loader.py``, kept
in its ``--cache-dir`` between runs, about 0.12 GB on disk per 1,000 slices): the raw float16 decode of the whole store (the ceiling) and a
streaming epoch under the ``--cache-gb`` budget, in a child process that reports its peak memory,
in the same run. ``--loader-slices 0`` skips it. Everything is written under ``--workdir`` (a
temporary folder by default) and removed at the end unless ``--keep``.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/loader.py, as ``loader``

SMALL = {"size": 32, "frames": (5, 5), "slices": (4, 4), "trivial": True}


def synth_pool(out: Path, n: int, batch: int = 100) -> None:
    """``n`` small M&Ms subjects under ``out`` with one CSV, written in batches of ``batch``.

    A phantom draw can break a reader invariant (e.g. ES labels larger than ED at 32 px); such a
    batch is drawn again with the next seed.
    """
    import csv

    from datastore.synth import MNMS_CSV, write_dataset

    rows: list[list[str]] = []
    header: list[str] = []
    seed = 0
    for first in range(0, n, batch):
        part = out.parent / f"{out.name}-part{first}"
        while True:
            shutil.rmtree(part, ignore_errors=True)
            try:
                write_dataset(part, "mnms", min(batch, n - first), seed=seed, **SMALL)  # type: ignore[arg-type]
                break
            except RuntimeError:
                seed += 1
        seed += 1
        with open(part / MNMS_CSV, newline="") as handle:
            header, *body = list(csv.reader(handle))
        rows.extend(body)
        out.mkdir(parents=True, exist_ok=True)
        for folder in (p for p in part.iterdir() if p.is_dir()):
            shutil.move(str(folder), out / folder.name)
        shutil.rmtree(part)
    with open(out / MNMS_CSV, "w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])


def subset_root(full: Path, out: Path, n: int) -> Path:
    """A root holding copies of the first ``n`` subject folders of ``full`` and its CSV (discovery does not follow links)."""
    from datastore.synth import MNMS_CSV

    out.mkdir(parents=True)
    shutil.copy(full / MNMS_CSV, out / MNMS_CSV)  # CSV rows without a folder are only warnings
    for folder in sorted(p for p in full.iterdir() if p.is_dir())[:n]:
        shutil.copytree(folder, out / folder.name)
    return out


def n_expected(raw: Path) -> int:
    return sum(1 for p in raw.iterdir() if p.is_dir())


def file_count(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file())


def measure_size(raw: Path, store: Path, loader_cache_gb: float) -> dict[str, Any]:
    """Ingest ``raw`` into ``store`` (serial), then rerun, validate and stream it."""
    from datastore.config import IngestConfig
    from datastore.ingest import execute_ingest, plan_ingest
    from datastore.store import store_size_bytes, validate_store

    config = IngestConfig(size=SMALL["size"])
    start = time.perf_counter()
    result = execute_ingest(plan_ingest({"mnms": raw}, store, config), executor="serial", progress=False)
    ingest_s = time.perf_counter() - start
    assert result.n_subjects == n_expected(raw), f"{raw}: {result.n_subjects} subjects in the store"
    commits = result.commits
    walls = np.diff([start] + [c[2] for c in commits])  # wall time between commits (one subject each)
    start = time.perf_counter()
    noop = plan_ingest({"mnms": raw}, store, config)
    noop_s = time.perf_counter() - start
    assert noop.noop, "the rerun found work to do"
    start = time.perf_counter()
    problems = validate_store(store, progress=False)
    validate_s = time.perf_counter() - start
    stream = streaming_in_child(store, loader_cache_gb)
    return {
        "subjects": result.n_subjects,
        "added": len(result.ingested),
        "slices": result.n_slices,
        "ingest_s": round(ingest_s, 2),
        "commit_ms_first_100": round(1e3 * float(np.mean([c[1] for c in commits[:100]])), 2),
        "commit_ms_last_100": round(1e3 * float(np.mean([c[1] for c in commits[-100:]])), 2),
        "subject_ms_first_100": round(1e3 * float(np.mean(walls[:100])), 1),
        "subject_ms_last_100": round(1e3 * float(np.mean(walls[-100:])), 1),
        "root_zarr_json_bytes": (store / "zarr.json").stat().st_size,
        "store_bytes": store_size_bytes(store),
        "files": file_count(store),
        "noop_rerun_s": round(noop_s, 3),
        "validate_s": round(validate_s, 2),
        "valid": not problems,
        "loader_slices_per_s": stream["rate"],
        "loader_peak_extra_mb": round(stream["peak_extra_bytes"] / 1e6, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def streaming_in_child(store: Path, cache_gb: float) -> dict[str, Any]:
    """``benchmarks/loader.py``'s streaming epoch in a fresh process (its peak memory is its own)."""
    import multiprocessing

    from loader import streaming_epoch  # benchmarks/loader.py

    with multiprocessing.get_context("spawn").Pool(1) as child:
        return child.apply(streaming_epoch, (str(store), 64, cache_gb))


def power_fit(sizes: list[int], values: list[float]) -> dict[str, float]:
    """``value = a * N ** b`` by least squares in log-log space."""
    b, log_a = np.polyfit(np.log(sizes), np.log(np.maximum(values, 1e-9)), 1)
    return {"a": float(f"{np.exp(log_a):.4g}"), "b": round(float(b), 2)}


def stage_costs(workdir: Path, n: int) -> dict[str, float]:
    """Per-subject stage costs of ``n`` full-size phantom subjects (128 px, stored at 256) on 2 Ray
    workers, measured as ``benchmarks/ingest.py`` does (workers warmed up before the clock)."""
    from ingest import run  # benchmarks/ingest.py

    from datastore.store import SliceStore, store_size_bytes
    from datastore.synth import write_dataset

    raw = workdir / "stage-raw"
    write_dataset(raw, "mnms", n, seed=1, size=128)
    measured = run(2, raw, workdir / "stage.zarr", 256)
    costs: dict[str, float] = dict(measured["stage_s_per_subject"])  # type: ignore[arg-type]
    costs["bytes"] = store_size_bytes(workdir / "stage.zarr") / n
    costs["files"] = file_count(workdir / "stage.zarr") / n
    costs["slices"] = SliceStore.open(workdir / "stage.zarr").n_slices / n
    costs["wall_2_workers"] = float(measured["seconds"]) / n  # type: ignore[arg-type]
    return {k: round(v, 4) for k, v in costs.items()}


def projection(stages: dict[str, float], per_subject: dict[str, float], subjects: int = 50_000, workers: int = 16) -> dict[str, Any]:
    """Ingest of ``subjects`` on ``workers`` workers: workers bound vs driver bound, and the totals."""
    worker_s = stages["process"] + stages["write"]
    driver_s = stages["allocate"] + stages["commit"]
    rate = min(workers / worker_s, 1 / driver_s)
    return {
        "subjects": subjects,
        "workers": workers,
        "bound": "workers" if workers / worker_s < 1 / driver_s else "driver",
        "subjects_per_s": round(rate, 2),
        "ingest_hours": round(subjects / rate / 3600, 2),
        "store_tb": round(stages["bytes"] * subjects / 1e12, 2),
        "files_millions": round(stages["files"] * subjects / 1e6, 2),
        "slices_millions": round(stages["slices"] * subjects / 1e6, 2),
        "noop_rerun_s": round(per_subject["noop_rerun_s"] * subjects, 1),
        "validate_hours_small_images": round(per_subject["validate_s"] * subjects / 3600, 2),
    }


def loader_part(cache_dir: Path, slices: int, cache_gb: float) -> dict[str, Any]:
    """Raw decode ceiling and a budgeted streaming epoch on a ``slices``-slice 256 x 256 store."""
    from loader import build_store, sequential  # benchmarks/loader.py

    store = build_store(cache_dir / f"store-{slices}.zarr", slices)
    raw = sequential(store, as_float32=False)
    stream = streaming_in_child(store, cache_gb)
    return {
        "slices": slices,
        "cache_gb": cache_gb,
        "share_gb": round(slices * 256 * 256 * 2 / 1e9, 2),
        "plan": stream["plan"],
        "raw_decode_slices_per_s": raw,
        "streaming_slices_per_s": stream["rate"],
        "streaming_vs_raw_decode": round(stream["rate"] / raw, 2),
        "peak_extra_gb": round(stream["peak_extra_bytes"] / 1e9, 3),
        "shuffle": stream["shuffle"],
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000], help="subject counts")
    parser.add_argument("--stage-subjects", type=int, default=4, help="full-size subjects for the stage costs")
    parser.add_argument("--loader-slices", type=int, default=100_000, help="256x256 slices of the loader store (0: skip)")
    parser.add_argument("--cache-gb", type=float, default=1.0, help="loader memory budget (GB)")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "sspctl-bench-loader",
                        help="where benchmarks/loader.py keeps its stores (the loader part reuses them)")  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the stores")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sspctl-bench-scale-"))
    try:
        full = workdir / "raw"
        if not full.exists():
            synth_pool(full, max(args.sizes))
        sizes = sorted(args.sizes)
        by_size = {}
        for n in sizes:
            root = subset_root(full, workdir / f"raw-{n}", n)
            by_size[str(n)] = measure_size(root, workdir / "store.zarr", args.cache_gb)
        metrics = ("commit_ms_last_100", "subject_ms_last_100", "store_bytes", "files", "noop_rerun_s", "validate_s", "root_zarr_json_bytes")
        fits = {m: power_fit(sizes, [by_size[str(n)][m] for n in sizes]) for m in metrics}
        largest = by_size[str(sizes[-1])]
        per_subject = {k: largest[k] / largest["subjects"] for k in ("noop_rerun_s", "validate_s")}
        stages = stage_costs(workdir, args.stage_subjects)
        result = {
            "benchmark": "scale",
            "cpus": os.cpu_count(),
            "ingest": {"subject": {"size": SMALL["size"], "frames": 5, "slices": 4}, "by_size": by_size, "fits": fits},
            "stage_costs_per_subject": stages,
            "projection": projection(stages, per_subject),
            "loader": loader_part(args.cache_dir, args.loader_slices, args.cache_gb) if args.loader_slices else None,
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        }
        print(json.dumps(result, indent=2))
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
