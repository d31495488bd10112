"""Per-clip pixel statistics (brightness, saturation, motion) of the sampled frames, letterbox excluded.

Torch-free: decoder processes compute them beside the frames, off the model's thread.
"""

from __future__ import annotations

import numpy as np

from jungletrap.video import ClipInfo, letterbox_box

__all__ = ["pixel_stats"]

_MOTION_THRESHOLD = 0.02  # mean |difference| of grey levels (0..1) above which a frame pair "moves"


def pixel_stats(frames: np.ndarray, info: ClipInfo, size: int) -> dict[str, float]:
    """Brightness, colour saturation and frame-to-frame motion of the sampled frames (letterbox excluded).

    Channels are taken as three planes: numpy reductions over a length-3 last axis ran ~20x slower, and at
    ~0.2 s a clip they were the embed stage's bottleneck on a GPU worker (bench/gpu.py).
    """
    box = _content(frames, info, size)
    r, g, b = box[..., 0], box[..., 1], box[..., 2]
    grey = (r.astype(np.float32) + g + b) * np.float32(1 / (3 * 255))
    high = np.maximum(np.maximum(r, g), b)
    low = np.minimum(np.minimum(r, g), b)
    saturation = (high - low).astype(np.float32) / np.maximum(high, 1).astype(np.float32)  # 0 on black pixels
    stats = {
        "brightness_mean": float(grey.mean()),
        "saturation_mean": float(saturation.mean()),
        "motion_mean": float("nan"),
        "motion_max": float("nan"),
        "motion_p50": float("nan"),
        "motion_p90": float("nan"),
        "motion_frac": float("nan"),
    }
    if len(grey) > 1:  # one frame has no motion to measure: NaN, not zero
        diff = np.abs(np.diff(grey, axis=0)).mean(axis=(1, 2))
        stats.update(
            motion_mean=float(diff.mean()),
            motion_max=float(diff.max()),
            motion_p50=float(np.percentile(diff, 50)),
            motion_p90=float(np.percentile(diff, 90)),
            motion_frac=float((diff > _MOTION_THRESHOLD).mean()),
        )
    return stats


def _content(frames: np.ndarray, info: ClipInfo, size: int) -> np.ndarray:
    """The frames without the letterbox bands (one pixel of margin against rounding)."""
    if info.width <= 0 or info.height <= 0:
        return frames
    top, left, h, w = letterbox_box(info.width, info.height, size)
    box = frames[:, top + 1 : top + h - 1, left + 1 : left + w - 1]
    return box if box.size else frames
