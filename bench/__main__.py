"""``python -m bench`` (``make bench``): every benchmark in one go, each printing its table, then a summary.

The embed and memory benchmarks make their own clips, the blend benchmark its own OOF predictions, the scale
rehearsal its own embeddings (``--scale-sizes``, default 2,000 and 20,000 clips: the longest benchmark); the
feature and XGBoost benchmarks use a finished run's feature table (``--run-dir``, default ``runs/demo``: run
``make demo`` first); the GPU benchmark runs where torch sees a CUDA device. Results are merged into
``bench/results.json``; the summary (the issue's named keys, each with its target) is saved there under
``summary``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench import blend, embed, features, gpu, memory, scale, xgb
from bench.common import RESULTS_PATH, machine, print_table, save_results

#: Summary key -> (section, key in that section, target as (comparison, bound) or None).
SUMMARY: dict[str, tuple[str, str, tuple[str, float] | None]] = {
    "decode_s_per_video": ("embed", "decode_s_per_video", None),
    "naive_decode_s_per_video": ("embed", "naive_decode_s_per_video", None),
    "decode_speedup": ("embed", "decode_speedup", (">=", 2.5)),
    "openvino_over_torch_1_thread": ("embed", "openvino_over_torch_1_thread", (">=", 2.0)),
    "openvino_over_torch_all_threads": ("embed", "openvino_over_torch_all_threads", None),
    "model_only_s_per_video": ("embed", "model_only_s_per_video", None),
    "stage_s_per_video": ("embed", "stage_s_per_video", None),
    "stage_over_model": ("embed", "stage_over_model", ("<=", 1.1)),
    "scaling_2_over_1": ("embed", "scaling_2_over_1", (">=", 1.8)),
    "model_parallel_ceiling": ("embed", "model_parallel_ceiling", None),
    "peak_rss_mib_small": ("memory", "peak_rss_mib_small", None),
    "peak_rss_mib_large": ("memory", "peak_rss_mib_large", None),
    "peak_rss_growth": ("memory", "peak_rss_growth", ("<=", 0.10)),
    "xgb_dask_over_single": ("xgb", "xgb_dask_over_single", ("<=", 1.5)),
    **{f"scale_{k}": ("scale", k, ("<=", 0.10)) for k in (*(f"{s}_worker_peak_growth" for s in scale.BOUNDED),
                                                          "client_peak_growth")},
    "scale_xgb_growth_over_worker_share": ("scale", "xgb_growth_over_worker_share", ("<=", 3.0)),
    "scale_wall_growth_over_size_ratio": ("scale", "wall_growth_over_size_ratio", ("<=", 1.1)),
}


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """The named keys from each section's latest results, with whether each target is met."""
    summary: dict[str, Any] = {}
    rows = []
    for key, (section, name, target) in SUMMARY.items():
        value = results.get(section, {}).get(name)
        met = None
        if value is not None and target is not None:
            op, bound = target
            met = value >= bound if op == ">=" else value <= bound
        summary[key] = value
        if target is not None:
            summary[f"{key}_target_met"] = met
        note = "" if target is None else f"target {target[0]} {target[1]:g}: " + {True: "met", False: "MISSED",
                                                                                   None: "not measured"}[met]
        rows.append((key, value if value is not None else "-", note))
    print_table(f"summary ({machine()['cpus']} CPUs, {machine()['processor']})", rows)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--scale-sizes", type=int, nargs=2, default=[2000, 20000], metavar=("SMALL", "LARGE"))
    args = parser.parse_args()
    start = time.perf_counter()
    embed.main([])
    memory.main([])
    if (args.run_dir / "features").is_dir():
        features.main(["--run-dir", str(args.run_dir)])
        xgb.main(["--run-dir", str(args.run_dir)])
    else:
        print(f"\n{args.run_dir} has no feature table: run `make demo` for the feature and XGBoost benchmarks")
    gpu.main([])
    blend.main([])
    scale.main(["--sizes", *map(str, args.scale_sizes)])
    results = json.loads(RESULTS_PATH.read_text())
    summary = summarize(results)
    summary["bench_seconds"] = time.perf_counter() - start
    save_results("summary", summary)


if __name__ == "__main__":
    main()
