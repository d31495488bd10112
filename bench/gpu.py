"""GPU benchmark: backbone frames/s on CUDA, NVDEC vs CPU decode, and the embed stage on a LocalCUDACluster.

Run: ``python -m bench.gpu [--clips 32] [--out bench/results.json]`` on a machine where torch sees a GPU (on a
CPU-only machine it prints why it skipped). In one run, on the seed's clips (15 s of 640x360 30 fps H.264) and
sampling (3 fps x 15 s):
- ``model``: frames/s of each backbone (EfficientNet-Lite0; ResNet-152 skip features, random init: the speed
  does not depend on the weights) at 224 px and the seed's 404 px, in float32, bfloat16 autocast, and bfloat16
  with channels_last; uint8 frames already on the GPU, preprocessing included, timed with CUDA events;
- ``decode``: seconds per clip for ``read_clip`` on the CPU, a full CPU decode, and a full NVDEC decode (PyAV's
  ``hwaccel="cuda"``) when FFmpeg can open the device;
- ``ceiling``: ``read_clip`` on one FFmpeg thread, and the clips/s all cores but one could decode at that cost;
- ``stage``: the embed stage through Dask on a one-GPU LocalCUDACluster, files to Parquet, for several splits of
  the CPU cores (:data:`STAGE_VARIANTS`): decode threads in the worker (``embed.decode_threads``) or decoder
  processes (``embed.decode_processes``), times FFmpeg threads per clip (``embed.codec_threads``); and its ratio
  to the model-only rate (above 1: decode-bound).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    CLIP_FPS,
    CLIP_H,
    CLIP_SECONDS,
    CLIP_W,
    MAX_SECONDS,
    SAMPLE_FPS,
    median_seconds,
    print_table,
    save_results,
)

MODES = ("fp32", "bf16", "bf16+channels_last")


def _write_seed_clip(path: Path, i: int) -> Path:
    from jungletrap.synthetic import write_clip

    if not path.exists():
        write_clip(path, classes=["chimpanzee"] if i % 2 else ["blank"], seed=i, width=CLIP_W, height=CLIP_H,
                   fps=CLIP_FPS, seconds=CLIP_SECONDS)
    return path


def seed_clips_parallel(out_dir: Path, n: int) -> list[Path]:
    """``n`` seed-like clips written in parallel (the GPU machine has many cores)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"seed_clip_{i:04d}.mp4" for i in range(n)]
    with ProcessPoolExecutor(max_workers=min(n, os.cpu_count() or 1)) as pool:
        list(pool.map(_write_seed_clip, paths, range(n)))
    return paths


def model_frames_per_s(name: str, size: int, mode: str, *, batch: int, iters: int, repeats: int) -> float:
    import torch

    from jungletrap.backbones import build_backbone, get_spec, preprocess

    spec = get_spec(name)
    model = build_backbone(spec, "cuda")
    if mode != "bf16+channels_last":
        model = model.to(memory_format=torch.contiguous_format)
    frames = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device="cuda")

    def step() -> None:
        x = preprocess(frames, spec)
        x = x.contiguous(memory_format=torch.channels_last if mode == "bf16+channels_last" else
                         torch.contiguous_format)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode != "fp32"):
            model(x)

    for _ in range(3):
        step()
    rates = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        torch.cuda.synchronize()
        rates.append(batch * iters / (start.elapsed_time(end) / 1000))
    torch.cuda.empty_cache()
    return statistics.median(rates)


def _full_decode(path: Path, hwaccel: Any = None) -> tuple[int, str]:
    import av

    with av.open(str(path), hwaccel=hwaccel) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        n, fmt = 0, ""
        for frame in container.decode(stream):
            n, fmt = n + 1, frame.format.name
    return n, fmt


def measure_decode(clips: list[Path], repeats: int) -> dict[str, Any]:
    from jungletrap.video import read_clip

    def per_clip(fn: Any) -> float:
        return median_seconds(fn, repeats=repeats)[0] / len(clips)

    out: dict[str, Any] = {
        "read_clip_s_per_video": per_clip(lambda: [read_clip(p, sample_fps=SAMPLE_FPS, max_seconds=MAX_SECONDS,
                                                             size=224) for p in clips]),
        "cpu_full_decode_s_per_video": per_clip(lambda: [_full_decode(p) for p in clips]),
    }
    try:
        from av.codec.hwaccel import HWAccel

        hw = HWAccel(device_type="cuda", allow_software_fallback=False)
        frames, fmt = _full_decode(clips[0], hw)
        out["nvdec_frame_format"] = fmt
        out["nvdec_full_decode_s_per_video"] = per_clip(lambda: [_full_decode(p, hw) for p in clips])
    except Exception as err:  # no NVDEC in this FFmpeg or no device access: report why
        out["nvdec_error"] = f"{type(err).__name__}: {err}"
    return out


#: Ways to split a GPU worker's CPU cores for decoding, and partition sizes: (tag, clips per partition, embed
#: config keys). ``threads``: clips decoded at once in threads of the worker x FFmpeg threads each; ``processes``:
#: decoder processes (auto: all cores but one) x FFmpeg threads each. The worker runs one partition at a time, so
#: each partition boundary drains the decoders: small partitions show that cost.
STAGE_VARIANTS: tuple[tuple[str, int, dict[str, Any]], ...] = (
    ("threads_4x4_part64", 64, {"decode_processes": 0, "decode_threads": 4, "codec_threads": 4,
                                "prefetch_videos": 8}),
    ("processes_auto_x1_part16", 16, {"decode_processes": None, "codec_threads": 1}),
    ("processes_auto_x1_part64", 64, {"decode_processes": None, "codec_threads": 1}),
)


def decode_ceiling(clips: list[Path], repeats: int) -> dict[str, Any]:
    """``read_clip`` on one FFmpeg thread, and the clips/s that all cores but one could decode at that cost."""
    from jungletrap.video import read_clip

    seconds = median_seconds(lambda: [read_clip(p, sample_fps=SAMPLE_FPS, max_seconds=MAX_SECONDS, size=224,
                                                threads=1) for p in clips], repeats=repeats)[0] / len(clips)
    cores = len(os.sched_getaffinity(0))
    return {"read_clip_1_thread_s_per_video": seconds, "decode_ceiling_videos_per_s": (cores - 1) / seconds}


def measure_stage(clips: list[Path], *, batch_size: int, repeats: int,
                  variants: tuple[tuple[str, int, dict[str, Any]], ...] = STAGE_VARIANTS) -> dict[str, Any]:
    """Videos/s of the embed stage on a one-GPU LocalCUDACluster for each of :data:`STAGE_VARIANTS`."""
    from jungletrap.catalog import catalog_from_paths, write_catalog
    from jungletrap.cluster import open_client
    from jungletrap.config import ClusterConfig, EmbedConfig
    from jungletrap.embed import embed_catalog

    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    out: dict[str, Any] = {}
    try:
        with open_client(ClusterConfig(kind="cuda", threads_per_worker=1)) as (client, info):
            out["workers"] = info.n_workers
            for tag, per_partition, keys in variants:
                catalog = work / f"catalog-{per_partition}.parquet"
                write_catalog(catalog_from_paths(clips, clips[0].parent, videos_per_partition=per_partition),
                              catalog)
                cfg = EmbedConfig(backbone="efficientnet_lite0", sample_fps=SAMPLE_FPS, max_seconds=MAX_SECONDS,
                                  batch_size=batch_size, device="cuda", **keys)
                embed_catalog(client, catalog, work / f"warm-{tag}", cfg)
                times = []
                for r in range(repeats):
                    begin = time.perf_counter()
                    embed_catalog(client, catalog, work / f"out-{tag}-{r}", cfg)
                    times.append(time.perf_counter() - begin)
                out[f"stage_videos_per_s_{tag}"] = len(clips) / statistics.median(times)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clip-dir", type=Path, default=Path(tempfile.gettempdir()) / "jungletrap-gpu-clips")
    parser.add_argument("--out", type=Path, default=None, help="also write the section as JSON here")
    parser.add_argument("--sections", default="model,decode,ceiling,stage", help="comma-separated subset to run")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench.gpu: torch sees no CUDA device; skipped")
        return {}
    start = time.perf_counter()
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    rows: list[tuple[str, Any, str]] = []
    errors: dict[str, str] = {}

    def attempt(what: str, fn: Any) -> Any:
        """One section failing (a missing decoder, an out-of-memory size) must not cost the others."""
        try:
            return fn()
        except Exception as err:
            errors[what] = f"{type(err).__name__}: {err}"
            print(f"bench.gpu: {what} failed: {errors[what]}", flush=True)
            return None

    sections = set(args.sections.split(","))
    for name in ("efficientnet_lite0", "resnet152_skip") if "model" in sections else ():
        for size in (224, 404):
            for mode in MODES:
                key = f"model_fps_{name}_{size}_{mode.replace('+', '_')}"
                fps = attempt(key, lambda n=name, s=size, m=mode: model_frames_per_s(
                    n, s, m, batch=args.batch, iters=10, repeats=args.repeats))
                if fps is not None:
                    result[key] = fps
                    rows.append((key, fps, f"frames/s, batch {args.batch}"))
    clips = seed_clips_parallel(args.clip_dir, args.clips)
    if "decode" in sections:
        decode = attempt("decode", lambda: measure_decode(clips[:8], args.repeats)) or {}
        result.update(decode)
        rows += [(k, v, "s per clip") for k, v in decode.items() if k.endswith("_s_per_video")]
    if "ceiling" in sections:
        ceiling = attempt("ceiling", lambda: decode_ceiling(clips[:8], args.repeats)) or {}
        result.update(ceiling)
        if ceiling:
            rows += [("read_clip_1_thread_s_per_video", ceiling["read_clip_1_thread_s_per_video"],
                      "s per clip, one FFmpeg thread"),
                     ("decode_ceiling_videos_per_s", ceiling["decode_ceiling_videos_per_s"],
                      "all cores but one decoding: the stage's CPU bound")]
    if "stage" in sections:
        stage = attempt("stage", lambda: measure_stage(clips, batch_size=128, repeats=args.repeats)) or {}
        result.update(stage)
        rows += [(k, v, f"{len(clips)} clips; decoders x FFmpeg threads each; files -> Parquet")
                 for k, v in stage.items() if k.startswith("stage_videos_per_s")]
    lite = result.get("model_fps_efficientnet_lite0_224_bf16_channels_last")
    stages = [v for k, v in result.items() if k.startswith("stage_videos_per_s")]
    if lite and stages:
        result["model_only_videos_per_s"] = lite / (SAMPLE_FPS * MAX_SECONDS)
        result["stage_over_model_gpu"] = result["model_only_videos_per_s"] / max(stages)
        rows += [("model_only_videos_per_s", result["model_only_videos_per_s"], "Lite0 224 bf16+CL, 45 frames/clip"),
                 ("stage_over_model_gpu", result["stage_over_model_gpu"], "time ratio: >1 means decode-bound")]
    result["errors"] = errors
    result["bench_seconds"] = time.perf_counter() - start
    print_table(f"gpu ({result['device']}, torch {result['torch']}, medians of {args.repeats})", rows)
    if "nvdec_error" in result:
        print(f"  NVDEC: {result['nvdec_error']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, sort_keys=True))
    else:
        save_results("gpu", result)
    return result


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
