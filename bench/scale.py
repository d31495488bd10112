"""Scale rehearsal: every stage after embed at two sizes, with per-stage wall time and peak memory.

Run: ``python -m bench.scale [--sizes 2000 20000] [--dim 1280] [--frames 45]``. For each size,
``jungletrap demo-embeddings``' generator writes a finished catalog + embed stage (no video decoded), then on a
fresh 2-worker x 1-thread LocalCluster the bench runs, one at a time: ``features`` (the pipeline stage),
``xgb`` and ``head`` (the train stage, one model each), ``ensemble`` (the pipeline stage, report included) and
``predict`` (what ``jungletrap predict`` does after embedding: the features with the run's fitted transform,
both models' fold averages, the blend, over every clip). Before each stage every worker's and the client's
peak RSS is reset (workers restarted, then ``/proc/<pid>/clear_refs``), after it the peaks are read (each size
runs in its own Python process): each worker process plus its
children (decoders, none after embed), and the client process alone (it also hosts the LocalCluster's scheduler
and nannies; the worker processes are its children, measured on their own).

Reduced training (stated in the results): XGBoost ``--rounds`` rounds (default 20, early stopping after 5),
the head ``--epochs`` epochs (default 2, patience 1); everything else is the default config.
Targets (issue 15), from the small size to the large: peak worker RSS of features, head, ensemble and predict
and the client's grow <= 10 %; XGBoost's peak worker RSS grows by at most 3x a worker's share of the float32
feature matrix (rows x features x 4 B / workers); total wall time grows <= 1.1x the size ratio (11x for 10x).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import print_table, save_results

STAGES = ("features", "xgb", "head", "ensemble", "predict")
BOUNDED = ("features", "head", "ensemble", "predict")  # peak worker RSS must not grow with N


# ---------------------------------------------------------------- peak memory (run on workers and here)


def _pids(children: bool) -> list[int]:
    """This process and, with ``children``, all its descendants."""
    import psutil

    me = psutil.Process()
    return [me.pid, *(c.pid for c in me.children(recursive=True) if children)]


def reset_peaks(children: bool = True) -> None:
    """Reset the peak RSS (VmHWM) of this process (and its children) to their current RSS."""
    for pid in _pids(children):
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            pass


def peak_mib(children: bool = True) -> float:
    """Peak RSS since the last reset of this process (plus its live children's), in MiB."""
    total = 0.0
    for pid in _pids(children):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")),
                      0.0)
    return total


def measure(client: Any, fn: Callable[[], Any]) -> dict[str, Any]:
    """Wall time and peaks of one stage, on freshly restarted workers (a worker's RSS does not drop after a stage:
    without the restart, the head's memory would count as the next stage's peak)."""
    try:
        client.restart(timeout=300)
    except TimeoutError as err:  # a loaded machine: measure anyway, from the workers' current RSS
        print(f"  (worker restart timed out: {err}; peaks start from the current RSS)", flush=True)
    client.run(reset_peaks)
    reset_peaks(children=False)  # the client's children are the LocalCluster's workers, measured on their own
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    workers = client.run(peak_mib)
    return {"wall_s": round(wall, 2), "worker_peak_rss_mib": [round(v, 1) for _, v in sorted(workers.items())],
            "client_peak_rss_mib": round(peak_mib(children=False), 1)}


# ---------------------------------------------------------------- the stages


#: ``--set`` overrides given to the bench (stated in its results), applied after the reduced training ones.
EXTRA_SETS: list[str] = []


def _cfg(run_dir: Path, rounds: int, epochs: int, models: list[str] | None = None) -> Any:
    from jungletrap.config import load_config

    sets = [f"train.xgb.n_estimators={rounds}", "train.xgb.early_stopping_rounds=5", f"train.head.epochs={epochs}",
            "train.head.patience=1", "cluster.kind=cpu", *EXTRA_SETS]
    if models:
        sets.append(f"train.models=[{','.join(models)}]")
    return load_config(run_dir / "config.yaml", sets)


def _train_one(client: Any, run_dir: Path, cfg: Any, metrics: dict[str, Any]) -> None:
    from jungletrap.train import run_train

    path = run_dir / "train_metrics.json"
    earlier = json.loads(path.read_text()) if path.is_file() else {}  # a model trained in an earlier process
    run_train(client, cfg, run_dir)
    metrics.update({**earlier, **json.loads(path.read_text())})
    _write_json(path, metrics)


def _predict(client: Any, run_dir: Path, cfg: Any) -> None:
    """``predict_videos`` after its embed step, over every clip of the run (every backbone's embeddings)."""
    import pandas as pd

    from jungletrap.predict import score_embedded
    from jungletrap.schema import VIDEO_ID
    from jungletrap.storage import read_parquet
    from jungletrap.train import embed_dirs

    index = pd.Index(read_parquet(run_dir / "catalog.parquet", columns=[VIDEO_ID])[VIDEO_ID])
    proba = score_embedded(client, run_dir, embed_dirs(cfg, run_dir), run_dir / "predict" / "bench", cfg.features,
                           index)
    assert len(proba) == len(index)


def _disk_mib(run_dir: Path) -> float:
    return round(sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file()) / 2**20, 1)


def run_size(n: int, *, dim: int, frames: int, rounds: int, epochs: int, work: Path, videos_per_partition: int = 32,
             stages: tuple[str, ...] = STAGES, reuse: bool = False) -> dict[str, Any]:
    """One size: generate (unless ``reuse`` finds a finished rehearsal), then ``stages`` in order.

    ``stages`` and ``reuse`` let a long run (the 200,000-clip rehearsal) be measured in several processes.
    """
    from jungletrap.cluster import open_client
    from jungletrap.synthetic_embeddings import RehearsalSpec, write_rehearsal

    run_dir = work / f"scale-{n}"
    result: dict[str, Any] = {"clips": n, "videos_per_partition": videos_per_partition}
    start = time.perf_counter()
    if not (reuse and (run_dir / "config.yaml").is_file()):
        shutil.rmtree(run_dir, ignore_errors=True)
        with open_client(_cfg_for_cluster()) as (client, _):
            write_rehearsal(client, run_dir, RehearsalSpec(n=n, dim=dim, frames=frames,
                                                           videos_per_partition=videos_per_partition))
        result["generate_s"] = round(time.perf_counter() - start, 2)
        result["generated_disk_mib"] = _disk_mib(run_dir)
    full = _cfg(run_dir, rounds, epochs)
    cluster = open_client(full.cluster)
    client, info = cluster.__enter__()
    try:
        _run_stages(client, info, run_dir, full, rounds, epochs, result, stages)
    finally:
        try:
            cluster.__exit__(None, None, None)
        except TimeoutError as err:  # a worker slow to exit (a loaded machine) must not cost the figures
            print(f"  (cluster close timed out: {err!r}; figures kept)", flush=True)
    result["disk_mib"] = _disk_mib(run_dir)
    if (run_dir / "metrics.json").is_file():
        out = json.loads((run_dir / "metrics.json").read_text())
        result["oof_log_loss"] = {m: v["mean_log_loss"] for m, v in out["oof"].items()}
    if (run_dir / "models" / "xgb" / "features.json").is_file():
        spec = json.loads((run_dir / "models" / "xgb" / "features.json").read_text())
        result["n_features"] = len(spec["features"])
    result["total_s"] = round(time.perf_counter() - start, 2)
    return result


def _run_stages(client: Any, info: Any, run_dir: Path, full: Any, rounds: int, epochs: int,
                result: dict[str, Any], stages: tuple[str, ...] = STAGES) -> None:
    from jungletrap.pipeline import StageContext, run_pipeline

    ctx = StageContext(client, full, run_dir, info)
    metrics: dict[str, Any] = {}
    if "ensemble" in stages and (run_dir / "train_metrics.json").is_file():  # trained in an earlier process
        metrics.update(json.loads((run_dir / "train_metrics.json").read_text()))
    steps = {
        "features": lambda: run_pipeline(ctx, stages=["features"]),
        "xgb": lambda: _train_one(client, run_dir, _cfg(run_dir, rounds, epochs, ["xgb"]), metrics),
        "head": lambda: _train_one(client, run_dir, _cfg(run_dir, rounds, epochs, ["head"]), metrics),
        "ensemble": lambda: (_write_json(run_dir / "train_metrics.json", metrics),
                             run_pipeline(ctx, stages=["ensemble"], force=True)),
        "predict": lambda: _predict(client, run_dir, full),
    }
    for stage in stages:
        result[stage] = measure(client, steps[stage])
        print(f"  {result['clips']} clips, {stage}: {result[stage]}", flush=True)


def _cfg_for_cluster() -> Any:
    from jungletrap.config import ClusterConfig

    return ClusterConfig(kind="cpu", n_workers=2, threads_per_worker=1)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------- growth and targets


def growth(small: dict[str, Any], large: dict[str, Any], n_workers: int = 2) -> dict[str, Any]:
    """Per stage: peak worker RSS, client RSS and wall ratios; the issue's targets and whether each is met."""
    out: dict[str, Any] = {}
    for stage in STAGES:
        s, g = small[stage], large[stage]
        out[stage] = {"worker_peak_ratio": round(max(g["worker_peak_rss_mib"]) / max(s["worker_peak_rss_mib"]), 3),
                      "client_peak_ratio": round(g["client_peak_rss_mib"] / s["client_peak_rss_mib"], 3),
                      "wall_ratio": round(g["wall_s"] / max(s["wall_s"], 1e-9), 2)}
    share = large["clips"] * large["n_features"] * 4 / n_workers / 2**20
    xgb_growth = max(large["xgb"]["worker_peak_rss_mib"]) - max(small["xgb"]["worker_peak_rss_mib"])
    size_ratio = large["clips"] / small["clips"]
    wall = sum(large[s]["wall_s"] for s in STAGES) / sum(small[s]["wall_s"] for s in STAGES)
    client = max(large[s]["client_peak_rss_mib"] for s in STAGES) / max(small[s]["client_peak_rss_mib"] for s in STAGES)
    targets = {f"{s}_worker_peak_growth_le_10pct": out[s]["worker_peak_ratio"] <= 1.10 for s in BOUNDED}
    targets["client_peak_growth_le_10pct"] = client <= 1.10
    targets["xgb_growth_le_3x_worker_share"] = xgb_growth <= 3 * share
    targets["wall_growth_le_1.1x_size_ratio"] = wall <= 1.1 * size_ratio
    out["summary"] = {"size_ratio": size_ratio, "wall_ratio": round(wall, 2), "client_peak_ratio": round(client, 3),
                      "xgb_worker_growth_mib": round(xgb_growth, 1), "xgb_worker_share_mib": round(share, 1)}
    out["targets"] = targets
    return out


def flat_keys(g: dict[str, Any]) -> dict[str, float]:
    """The growth figures as flat keys of ``results["scale"]``, for the bench summary (targets in __main__)."""
    keys = {f"{s}_worker_peak_growth": round(g[s]["worker_peak_ratio"] - 1, 3) for s in BOUNDED}
    keys["client_peak_growth"] = round(g["summary"]["client_peak_ratio"] - 1, 3)
    keys["xgb_growth_over_worker_share"] = round(g["summary"]["xgb_worker_growth_mib"]
                                                 / max(g["summary"]["xgb_worker_share_mib"], 1e-9), 2)
    keys["wall_growth_over_size_ratio"] = round(g["summary"]["wall_ratio"] / g["summary"]["size_ratio"], 3)
    return keys


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[2000, 20000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--frames", type=int, default=45)
    parser.add_argument("--rounds", type=int, default=20, help="XGBoost rounds (early stopping after 5)")
    parser.add_argument("--epochs", type=int, default=2, help="head epochs (patience 1)")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary directory, removed")
    parser.add_argument("--videos-per-partition", type=int, default=32)
    parser.add_argument("--single", default=None, metavar="JSON",
                        help="one size (the first of --sizes), in --work-dir; figures merged into this JSON file")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="with --single")
    parser.add_argument("--reuse", action="store_true", help="with --single: keep a rehearsal already generated")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for every stage, e.g. train.xgb.max_bin=64 (stated in the results)")
    args = parser.parse_args(argv)
    EXTRA_SETS[:] = args.overrides
    if args.single:
        one = run_size(args.sizes[0], dim=args.dim, frames=args.frames, rounds=args.rounds, epochs=args.epochs,
                       work=args.work_dir, videos_per_partition=args.videos_per_partition,
                       stages=tuple(args.stages), reuse=args.reuse)
        one["overrides"] = list(args.overrides)
        path = Path(args.single)
        earlier = json.loads(path.read_text()) if args.reuse and path.is_file() else {}
        Path(args.single).write_text(json.dumps({**earlier, **one}))
        return one
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        runs = {n: _run_in_process(n, args, work) for n in args.sizes}
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    small, large = (runs[n] for n in args.sizes)
    result = {"sizes": args.sizes, "dim": args.dim, "frames": args.frames, "n_workers": 2, "threads_per_worker": 1,
              "reduced": {"xgb_rounds": args.rounds, "xgb_early_stopping": 5, "head_epochs": args.epochs,
                          "head_patience": 1}, "overrides": list(args.overrides),
              "runs": {str(n): r for n, r in runs.items()}, "growth": growth(small, large)}
    result.update(flat_keys(result["growth"]))
    _print(result)
    save_results("scale", result)
    return result


def _run_in_process(n: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One size in a fresh Python process: the client's peak RSS must not carry the other size's allocations."""
    out = work / f"scale-{n}.json"
    cmd = [sys.executable, "-m", "bench.scale", "--sizes", str(n), str(n), "--dim", str(args.dim), "--frames",
           str(args.frames), "--rounds", str(args.rounds), "--epochs", str(args.epochs), "--work-dir", str(work),
           "--videos-per-partition", str(args.videos_per_partition), "--single", str(out),
           *(f"--set={o}" for o in args.overrides)]
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.read_text())


def _print(result: dict[str, Any]) -> None:
    small, large = (result["runs"][str(n)] for n in result["sizes"])
    rows = []
    for stage in STAGES:
        for r in (small, large):
            rows.append((f"{stage} @ {r['clips']}", r[stage]["wall_s"],
                         f"s; workers {r[stage]['worker_peak_rss_mib']} MiB, client {r[stage]['client_peak_rss_mib']}"))
    for r in (small, large):
        rows.append((f"generate @ {r['clips']}", r["generate_s"], f"s; {r['disk_mib']} MiB on disk"))
        rows.append((f"total @ {r['clips']}", r["total_s"], f"s (generation included); OOF {r['oof_log_loss']}"))
    g = result["growth"]
    rows += [(f"growth {k}", v, "") for k, v in g["summary"].items()]
    rows += [(f"target {k}", "met" if v else "MISSED", "") for k, v in g["targets"].items()]
    print_table(f"scale rehearsal {result['sizes']} clips, D {result['dim']}, T {result['frames']} "
                f"(reduced: {result['reduced']})", rows)


if __name__ == "__main__":
    main()
