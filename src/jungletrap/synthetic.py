"""Synthetic camera-trap demo data in the Pri-matrix layout: clips, label CSVs and a manifest.

Why: the pipeline needs a small, realistic and *learnable* dataset that anyone can build offline. Each of the 24
classes has a fixed drawn design (shape, size, colour, texture, gait, speed) moving over a textured forest scene
with wind and lighting changes, so pooled CNN features can separate the common classes. Priors are imbalanced like
a real camera-trap set, ~30% of clips are infrared night clips, and clips mix resolutions, frame rates (1 fps
included) and containers (MP4/MKV H.264, AVI MPEG-4, ASF MS-MPEG4v3, WMV WMV2). Frames are drawn with numpy and
OpenCV and encoded with PyAV's bundled FFmpeg using deterministic settings (one encoder thread, bit-exact muxing).

Completeness: each clip and CSV is written under a temporary name and renamed, and ``MANIFEST.json`` is written
last, so :func:`demo_dataset_complete` is the one check a caller needs before skipping generation.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import av
import cv2
import numpy as np
import pandas as pd

from jungletrap.schema import CLASS_NAMES, FILENAME, SPLIT_TEST, SPLIT_TRAIN

__all__ = [
    "CLASS_PRIORS",
    "GENERATOR_VERSION",
    "MANIFEST_NAME",
    "DemoDataset",
    "demo_dataset_complete",
    "generate_demo_dataset",
    "write_clip",
    "write_static_clip",
]

GENERATOR_VERSION = "1"
MANIFEST_NAME = "MANIFEST.json"
BLANK = CLASS_NAMES[CLASS_NAMES.index("blank")]
BLANK_SHARE = 0.35  # share of blank clips; the others draw a primary class from CLASS_PRIORS
MULTI_LABEL_SHARE = 0.15  # of non-blank clips get a second class, i.e. ~10% of all clips
#: Relative weights of the primary class of a non-blank clip (camera-trap-like imbalance).
CLASS_PRIORS: dict[str, float] = {
    "chimpanzee": 0.14, "duiker": 0.14, "small antelope": 0.08, "human": 0.08, "other (primate)": 0.08,
    "elephant": 0.07, "bird": 0.06, "rodent": 0.05, "hog": 0.05, "other (non-primate)": 0.05,
    "porcupine": 0.03, "forest buffalo": 0.03, "gorilla": 0.03, "leopard": 0.02, "large ungulate": 0.02,
    "cattle": 0.015, "small cat": 0.01, "reptile": 0.01, "pangolin": 0.008, "hyena": 0.006,
    "wild dog": 0.005, "hippopotamus": 0.005, "lion": 0.004,
}  # fmt: skip
_RESOLUTIONS, _RESOLUTION_P = ((320, 180), (480, 270), (640, 360), (320, 240), (480, 360)), (.35, .3, .15, .12, .08)
_FPS, _FPS_P = (1.0, 8.0, 12.0, 15.0, 24.0), (0.1, 0.15, 0.25, 0.3, 0.2)
_EXTS, _EXT_P = (".mp4", ".mkv", ".avi", ".asf", ".wmv"), (0.62, 0.1, 0.14, 0.07, 0.07)
_CODEC_BY_EXT = {".mp4": "libx264", ".mkv": "libx264", ".mov": "libx264", ".avi": "mpeg4", ".asf": "msmpeg4",
                 ".wmv": "wmv2"}  # fmt: skip
_BLANK_NIGHT = 0.3  # night probability of a blank clip
_POSES = 4  # gait poses pre-drawn per animal


class _Design(NamedTuple):
    """How a class looks and moves: size is body length / frame height, other lengths are relative to the body.

    shape: ellipse | rect | wedge (high shoulders) | hunch (high rump) | upright; colours 0xRRGGBB; pattern: none |
    spots | rosettes | stripes | patches | band | scales | belly; extra: wings (flies) | trunk | horns | mane |
    quills | snout | tailup (climbs) | tailtip | thicktail; speed in frame widths/s (gait and leg width follow
    from speed and size); night: probability that a clip with this class is an infrared night clip.
    """

    shape: str
    size: float
    aspect: float
    color: int
    pattern: str
    pattern_color: int
    leg_len: float
    head: float
    head_color: int
    tail: float
    extra: str
    speed: float
    bob: float
    night: float


_D = _Design
# fmt: off
_DESIGNS: dict[str, _Design] = {  # shape size aspect colour pattern pattern-colour leg head head-colour tail extra speed bob night
    "bird": _D("ellipse", .10, .45, 0xBE2D28, "band", 0x28288C, 0, .45, 0xBE2D28, .35, "wings", .3, .5, .05),
    "cattle": _D("rect", .55, .5, 0xEBE6DC, "patches", 0x191919, 1, .4, 0xEBE6DC, .35, "horns", .06, .05, .1),
    "chimpanzee": _D("wedge", .32, .55, 0x1E1C1C, "none", 0, 1, .42, 0xC89682, 0, "", .12, .12, .15),
    "elephant": _D("ellipse", .75, .62, 0x787673, "none", 0, .9, .45, 0x6E6C69, .15, "trunk", .05, .03, .35),
    "forest buffalo": _D("rect", .5, .55, 0x8C3C1E, "none", 0, .8, .38, 0x783219, .3, "horns", .08, .05, .4),
    "gorilla": _D("wedge", .5, .65, 0x323237, "band", 0xAAAAAF, .8, .38, 0x232328, 0, "", .06, .08, .15),
    "hippopotamus": _D("ellipse", .6, .55, 0x966E78, "none", 0, .45, .45, 0xA0787D, .1, "snout", .05, .04, .75),
    "human": _D("upright", .5, .28, 0x2850AA, "none", 0x32323C, 1.6, .45, 0xAA785A, 0, "", .15, .05, .05),
    "hyena": _D("wedge", .4, .5, 0xAF9164, "spots", 0x3C2D1E, 1, .4, 0x5A4632, .2, "", .14, .08, .75),
    "large ungulate": _D("rect", .5, .45, 0x964623, "stripes", 0xF5F5EB, 1.5, .35, 0x823C1E, .2, "horns", .1, .06, .4),
    "leopard": _D("ellipse", .42, .38, 0xD7AA46, "rosettes", 0x281E14, 1, .4, 0xD7AA46, .8, "", .12, .05, .7),
    "lion": _D("rect", .5, .42, 0xC8A064, "none", 0, 1, .48, 0xC8A064, .6, "mane", .1, .05, .5),
    "other (non-primate)": _D("ellipse", .3, .32, 0x96968C, "spots", 0x141414, .6, .35, 0x282828, .9, "", .2, .04, .6),
    "other (primate)": _D("ellipse", .22, .5, 0x5A5A46, "none", 0, .9, .5, 0xD2BE96, 1.1, "tailup", .22, .35, .15),
    "pangolin": _D("ellipse", .3, .35, 0x82693C, "scales", 0x46371E, .35, .3, 0x785F37, .8, "thicktail", .05, .02, .85),
    "porcupine": _D("ellipse", .2, .55, 0x28231E, "none", 0, .3, .35, 0x28231E, .15, "quills", .06, .03, .85),
    "reptile": _D("ellipse", .4, .16, 0x465028, "stripes", 0xC8BE5A, .6, .6, 0x465028, 1, "thicktail", .05, 0, .2),
    "rodent": _D("ellipse", .09, .55, 0x6E5037, "none", 0, .3, .45, 0x6E5037, .9, "", .35, .1, .6),
    "small antelope": _D("rect", .3, .5, 0xBE642D, "belly", 0xF0EBE1, 1.5, .35, 0xB45F2D, .1, "horns", .2, .12, .3),
    "small cat": _D("ellipse", .22, .4, 0xA8763F, "stripes", 0x32281E, .9, .42, 0xA8763F, .7, "", .15, .05, .7),
    "wild dog": _D("rect", .35, .45, 0xA08246, "patches", 0x1E1914, 1.2, .4, 0x1E1914, .4, "tailtip", .25, .1, .3),
    "duiker": _D("hunch", .24, .55, 0x55463C, "none", 0, .9, .35, 0x4B3C32, .1, "horns", .12, .08, .3),
    "hog": _D("ellipse", .35, .55, 0xC85F28, "band", 0xF0EBDC, .5, .45, 0xBE5A28, .2, "snout", .1, .06, .4),
}
# fmt: on


@dataclass(frozen=True)
class DemoDataset:
    """Paths of a demo dataset in the competition layout under ``root``."""

    root: Path
    videos_dir: Path
    train_labels: Path
    submission_format: Path
    test_labels: Path
    manifest: Path

    @classmethod
    def at(cls, root: Path) -> DemoDataset:
        """The paths a dataset under ``root`` has, whether or not it is complete."""
        root = Path(root)
        return cls(root, root / "videos", root / "train_labels.csv", root / "submission_format.csv",
                   root / "test_labels.csv", root / MANIFEST_NAME)  # fmt: skip


@dataclass(frozen=True)
class _ClipPlan:
    filename: str
    split: str
    classes: tuple[str, ...]
    seed: int
    width: int
    height: int
    fps: float
    seconds: float
    night: bool


# ---------------------------------------------------------------- scene


def _rgb(hex_color: int, rng: np.random.Generator | None = None) -> tuple[int, int, int]:
    """0xRRGGBB as an RGB tuple, jittered a little per clip when ``rng`` is given."""
    rgb = np.array([(hex_color >> s) & 255 for s in (16, 8, 0)]) + (rng.integers(-12, 13, 3) if rng is not None else 0)
    r, g, b = (int(v) for v in np.clip(rgb, 0, 255))
    return r, g, b


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int, channels: int = 1) -> np.ndarray:
    small = rng.random((h // cell + 3, w // cell + 3, channels), dtype=np.float32)
    out = cv2.resize(small, (w + 3 * cell, h + 3 * cell), interpolation=cv2.INTER_CUBIC)
    return out.reshape(h + 3 * cell, w + 3 * cell, channels)[cell : cell + h, cell : cell + w]


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Forest scene: blotchy green/brown foliage, leaf-litter ground, a few dark trunks, mild defocus."""
    green, brown = np.array([40, 75, 30]) * rng.uniform(0.7, 1.4), np.array([95, 75, 45]) * rng.uniform(0.7, 1.3)
    ground = np.clip((np.arange(h)[:, None, None] / h - rng.uniform(0.5, 0.65)) * 6, 0, 1)
    mix = np.clip(_smooth_noise(rng, h, w, max(8, w // 6)) * 0.8 + ground * 0.6, 0, 1)
    img = (green * (1 - mix) + brown * mix) * (0.6 + 0.8 * _smooth_noise(rng, h, w, max(4, w // 40)))
    img += (_smooth_noise(rng, h, w, 2, 3) - 0.5) * 30
    for _ in range(int(rng.integers(2, 6))):
        x, tw, bottom = rng.uniform(0, w), rng.uniform(0.02, 0.08) * w, rng.uniform(0.55, 0.8) * h
        pts = np.array([[x - tw / 2, 0], [x + tw / 2, 0], [x + tw * 0.7, bottom], [x - tw * 0.7, bottom]])
        cv2.fillPoly(img, [pts.astype(np.int32)], (rng.uniform(0.25, 0.6) * np.array([110, 95, 80])).tolist())
    return np.clip(cv2.GaussianBlur(img, (0, 0), max(0.8, w / 400)), 0, 255).astype(np.uint8)


def _leaf_layer(rng: np.random.Generator, w: int, h: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Foreground leaves near the top and one side, padded so the frame loop can shift them (wind)."""
    img = np.zeros((h + 2 * pad, w + 2 * pad, 3), np.uint8)
    mask = np.zeros(img.shape[:2], np.uint8)
    side = float(rng.choice([0.0, 1.0]))
    for _ in range(int(rng.integers(15, 45))):
        x = rng.uniform(0, w) if rng.random() < 0.6 else rng.normal(side * w, 0.1 * w)
        axes = (int(rng.uniform(0.01, 0.04) * w) + 2, int(rng.uniform(0.005, 0.015) * w) + 1)
        args = ((int(x) + pad, int(abs(rng.normal(0, 0.25 * h))) + pad), axes, float(rng.uniform(0, 180)), 0, 360)
        cv2.ellipse(img, *args, (int(rng.uniform(20, 70)), int(rng.uniform(60, 140)), int(rng.uniform(15, 50))), -1)
        cv2.ellipse(mask, *args, 1, -1)
    return img, mask


# ---------------------------------------------------------------- animals


_Pose = tuple[np.ndarray, np.ndarray]  # sprite RGB and its 0/1 silhouette mask


class _Canvas:
    """An RGB sprite canvas and its silhouette mask, drawn together."""

    def __init__(self, size: int) -> None:
        self.img, self.mask = np.zeros((size, size, 3), np.uint8), np.zeros((size, size), np.uint8)

    def put(self, draw: Callable[[np.ndarray, Any], Any], color: Sequence[int]) -> None:
        draw(self.img, tuple(int(c) for c in color))
        draw(self.mask, 1)

    def line(self, pts: Sequence[Any], width: float, color: Sequence[int]) -> None:
        arr = [np.array(pts, np.float64).round().astype(np.int32)]
        self.put(lambda t, c: cv2.polylines(t, arr, False, c, max(1, int(width))), color)

    def circle(self, x: float, y: float, r: float, color: Sequence[int]) -> None:
        self.put(lambda t, c: cv2.circle(t, (int(x), int(y)), max(1, int(r)), c, -1), color)


def _sprite(d: _Design, length: float, pose: int, seed: int, colors: dict[str, Any]) -> _Pose:
    """One gait pose of an animal facing right, cropped to its silhouette: (rgb, uint8 0/1 mask)."""
    L, B = length, max(3.0, length * d.aspect)
    cv = _Canvas(int(3 * max(L, B * (1 + d.leg_len)) + 20))
    cx = cy = cv.img.shape[0] / 2
    body_c, head_c, pat_c = colors["body"], colors["head"], colors["pattern"]
    phase = 2 * np.pi * pose / _POSES
    body: Callable[[np.ndarray, Any], Any]
    if d.shape == "upright":  # L is the whole figure, the torso B wide; trousers in the pattern colour
        top, hip, leg = cy - L * 0.25, cy + L * 0.15, L * 0.45
        for k, dx in ((0, -B / 4), (np.pi, B / 4)):
            swing = np.sin(phase + k) * leg * 0.35
            cv.line([(cx + dx, hip), (cx + dx + swing, hip + leg)], B * 0.35, pat_c)
            cv.line([(cx + dx * 2.2, top + B * 0.2), (cx + dx * 2.2 - swing * 0.8, hip)], B * 0.22, head_c)
        body = lambda t, c: cv2.rectangle(t, (int(cx - B / 2), int(top)), (int(cx + B / 2), int(hip)), c, -1)
        hx, hy = cx, top - d.head * B
    else:
        legs, leg_w = (0 if d.extra == "wings" else 4), 0.1 + 0.25 * d.size  # big animals have thick legs
        for i in range(legs):  # two pairs, each pair half a stride apart
            swing = np.sin(phase + np.pi * (i // 2 + i % 2)) * B * d.leg_len * 0.35
            x = cx + (0.3 if i < 2 else -0.3) * L + (i % 2 - 0.5) * B * leg_w * 1.2
            cv.line([(x, cy + B * 0.2), (x + swing, cy + B / 2 + B * d.leg_len)], B * leg_w,
                    [c * (0.7 if i % 2 else 1) for c in body_c])  # fmt: skip
        if d.tail > 0:
            up = -0.9 if d.extra == "tailup" else 0.5
            end = (cx - L / 2 - d.tail * L * 0.6, cy + up * d.tail * L)
            mid = (cx - L / 2 - d.tail * L * 0.5, cy - B * (0.4 if d.extra == "tailup" else 0.1))
            cv.line([(cx - L / 2, cy - B * 0.2), mid, end], B * (0.35 if d.extra == "thicktail" else 0.1), body_c)
            if d.extra == "tailtip":
                cv.circle(*end, B * 0.12 + 1, (240, 240, 240))
        rise = {"wedge": (0.25, -0.15), "hunch": (-0.1, 0.3)}.get(d.shape, (0.0, 0.0))
        poly = np.array([[cx - L / 2, cy + B / 2], [cx - L / 2, cy - B / 2 + B * rise[0]],
                         [cx + L / 2, cy - B / 2 - B * rise[1]], [cx + L / 2, cy + B / 2]], np.int32)  # fmt: skip
        if d.shape == "ellipse":
            body = lambda t, c: cv2.ellipse(t, (int(cx), int(cy)), (int(L / 2), int(B / 2)), 0, 0, 360, c, -1)
        else:
            body = lambda t, c: cv2.fillPoly(t, [poly], c)
        hx, hy = cx + L / 2, cy - B * 0.35
    cv.put(body, body_c)
    body_mask = np.zeros_like(cv.mask)
    body(body_mask, 1)
    _pattern(cv.img, body_mask, d.pattern, pat_c, np.random.default_rng(seed), (cx - L / 2, cy - B / 2, L, B))
    r = d.head * B
    if d.extra == "mane":
        cv.circle(hx - r * 0.3, hy, r * 1.5, (130, 85, 40))
    cv.circle(hx, hy, r, head_c)
    _extra(cv, d.extra, pose, (hx, hy, r), (cx, cy, L, B), cy + B / 2 + B * d.leg_len)
    if r >= 3:  # eye
        cv2.circle(cv.img, (int(hx + r * 0.4), int(hy - r * 0.2)), max(1, int(r * 0.15)), (10, 10, 10), -1)
    ys, xs = np.nonzero(cv.mask)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    return cv.img[box], cv.mask[box]


def _pattern(img: np.ndarray, body: np.ndarray, kind: str, color: Sequence[int], rng: np.random.Generator,
             box: tuple[float, float, float, float]) -> None:  # fmt: skip
    """Texture inside the body silhouette only (the same ``rng`` seed gives the same pattern in every pose)."""
    if kind == "none":
        return
    x0, y0, L, B = box
    pat = np.zeros(body.shape, np.uint8)
    if kind in ("spots", "rosettes", "patches"):
        n, rad = {"spots": (14, B / 8), "rosettes": (16, B / 7), "patches": (5, B / 2.5)}[kind]
        for _ in range(n):
            p = (int(x0 + rng.uniform(0, L)), int(y0 + rng.uniform(0, B)))
            cv2.circle(pat, p, max(1, int(rad * rng.uniform(0.6, 1.2))), 1, max(1, int(B / 18)) if kind ==
                       "rosettes" else -1)  # fmt: skip
    elif kind == "stripes":
        for x in np.arange(x0, x0 + L, max(2.0, B / 3)):
            cv2.line(pat, (int(x), int(y0 - B)), (int(x), int(y0 + 2 * B)), 1, max(1, int(B / 10)))
    elif kind == "scales":
        for y in np.arange(y0, y0 + B, max(2.0, B / 4)):
            for x in np.arange(x0, x0 + L, max(2.0, B / 4)):
                cv2.ellipse(pat, (int(x), int(y)), (max(1, int(B / 7)),) * 2, 0, 0, 180, 1, 1)
    else:  # band along the back, or a pale belly
        top, bottom = (y0 - B, y0 + B / 3) if kind == "band" else (y0 + B * 0.7, y0 + 2 * B)
        cv2.rectangle(pat, (int(x0 - L), int(top)), (int(x0 + 2 * L), int(bottom)), 1, -1)
    img[(pat > 0) & (body > 0)] = color


def _extra(cv: _Canvas, kind: str, pose: int, head: tuple[float, float, float],
           box: tuple[float, float, float, float], foot: float) -> None:  # fmt: skip
    """Class-specific parts: wings and beak, trunk and ear, horns, quills, snout."""
    (hx, hy, r), (cx, cy, L, B) = head, box
    if kind == "wings":
        tip = cy - B * 1.6 if pose % 2 == 0 else cy + B * 1.4
        wing = np.array([[cx - L * 0.25, cy], [cx + L * 0.15, cy], [cx - L * 0.1, tip]], np.int32)
        cv.put(lambda t, c: cv2.fillPoly(t, [wing], c), (150, 35, 30))
        cv.line([(hx + r * 0.8, hy), (hx + r * 1.8, hy + r * 0.2)], r * 0.5, (230, 160, 40))
    elif kind == "trunk":
        ear = ((int(hx - r * 0.6), int(hy + r * 0.2)), (int(r * 0.8), int(r * 1.2)), 0, 0, 360)
        cv.put(lambda t, c: cv2.ellipse(t, *ear, c, -1), (95, 92, 90))
        cv.line([(hx + r * 0.6, hy), (hx + r, hy + r * 1.5), (hx + r * 0.7, foot - B * 0.2)], r * 0.45, (110, 108, 105))
        cv.line([(hx + r * 0.6, hy + r * 0.6), (hx + r * 1.4, hy + r * 1.1)], r * 0.15, (235, 230, 210))
    elif kind == "horns":
        for dx in (-0.3, 0.2):
            cv.line([(hx + dx * r, hy - r * 0.7), (hx + (dx - 0.5) * r, hy - r * 1.6)], r * 0.2, (60, 55, 50))
    elif kind == "quills":
        for i, a in enumerate(np.linspace(np.pi * 1.05, np.pi * 1.95, 21)):
            p = (cx + np.cos(a) * L * 0.45, cy + np.sin(a) * B * 0.45)
            q = (p[0] + np.cos(a) * B * 0.7, p[1] + np.sin(a) * B * 0.7)
            cv.line([p, q], max(1.0, B * 0.06), (235, 235, 230) if i % 2 else (20, 20, 20))
    elif kind == "snout":
        snout = ((int(hx + r * 0.5), int(hy - r * 0.3)), (int(hx + r * 1.5), int(hy + r * 0.6)))
        cv.put(lambda t, c: cv2.rectangle(t, *snout, c, -1), (120, 80, 80))


class _Actor(NamedTuple):
    poses: list[_Pose]
    xs: np.ndarray  # sprite centre x per frame
    ys: np.ndarray  # sprite bottom y per frame
    pose_idx: np.ndarray


def _actor(name: str, rng: np.random.Generator, w: int, h: int, fps: float, n: int) -> _Actor:
    """Draw one animal's poses and its path; it stays mostly in view so sampled frames see it."""
    d = _DESIGNS[name]
    depth = rng.uniform(0, 1)
    bottom = (0.78 + 0.16 * depth) * h
    if d.extra == "wings" or (d.extra == "tailup" and rng.random() < 0.5):  # flying / up in a tree
        bottom = rng.uniform(0.25, 0.6) * h
    length = max(6.0, d.size * h * (0.7 + 0.5 * depth) * rng.uniform(0.9, 1.1))
    colors = {"body": _rgb(d.color, rng), "head": _rgb(d.head_color, rng), "pattern": _rgb(d.pattern_color)}
    seed = int(rng.integers(2**31))
    poses = [_sprite(d, length, k, seed, colors) for k in range(_POSES)]
    direction = 1 if rng.random() < 0.5 else -1
    if direction < 0:
        poses = [(np.ascontiguousarray(img[:, ::-1]), np.ascontiguousarray(m[:, ::-1])) for img, m in poses]
    t, total = np.arange(n) / fps, n / fps
    travel = min(d.speed * rng.uniform(0.7, 1.3) * w * total, 0.85 * w)
    xs = rng.uniform(0.3, 0.7) * w + direction * (t / total - 0.5) * travel
    gait = (0.6 + 6 * d.speed) * rng.uniform(0.8, 1.2)  # strides (or wing beats) per second
    ys = bottom - d.bob * length * d.aspect * np.abs(np.sin(np.pi * gait * t + rng.uniform(0, np.pi)))
    if d.extra == "wings":
        ys = ys + 0.06 * h * np.sin(2 * np.pi * 0.3 * t + rng.uniform(0, 2 * np.pi))
    pose_idx = np.floor(gait * t * _POSES + rng.integers(_POSES)).astype(int) % _POSES
    return _Actor(poses, xs, ys, pose_idx)


def _paste(frame: np.ndarray, rgb: np.ndarray, mask: np.ndarray, cx: float, bottom: float) -> None:
    sh, sw = mask.shape
    x0, y0 = int(np.rint(cx - sw / 2)), int(np.rint(bottom - sh))
    fx0, fy0, fx1, fy1 = max(x0, 0), max(y0, 0), min(x0 + sw, frame.shape[1]), min(y0 + sh, frame.shape[0])
    if fx1 > fx0 and fy1 > fy0:
        src = (slice(fy0 - y0, fy1 - y0), slice(fx0 - x0, fx1 - x0))
        cv2.copyTo(rgb[src], mask[src], frame[fy0:fy1, fx0:fx1])  # in place, ~100x faster than np.copyto(where=)


# ---------------------------------------------------------------- frames and encoding


def _render(classes: Sequence[str], *, seed: int, width: int, height: int, fps: float, n_frames: int,
            night: bool) -> Iterator[np.ndarray]:  # fmt: skip
    """Yield RGB (day) or grey (night) frames. Scene randomness is drawn before the animals, so one seed with
    and without animals gives the same scene."""
    rng = np.random.default_rng(seed)
    bg = _background(rng, width, height)
    pad = max(2, width // 120)
    leaves, leaf_mask = _leaf_layer(rng, width, height, pad)
    t = np.arange(n_frames) / fps
    wind = 2 * np.pi * rng.uniform(0.3, 1.2) * t[:, None] * [1, 0.7] + rng.uniform(0, 2 * np.pi, 2)
    shift = np.round(pad * (1 + np.sin(wind) * [1, 0.5])).astype(int)  # per frame (dx, dy) in [0, 2 * pad]
    gain = 1 + rng.uniform(0.03, 0.15) * np.sin(2 * np.pi * t / rng.uniform(5, 20) + rng.uniform(0, 2 * np.pi))
    noise = rng.integers(0, 6, (3, height, width) if night else (3, height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    r2 = ((xx - width / 2) / width) ** 2 + ((yy - height / 2) / height) ** 2
    flash = np.clip(128 * (0.35 + 1.1 * np.exp(-r2 / 0.08)), 0, 255).astype(np.uint8)  # IR flash falloff
    hour = int(rng.choice([19, 20, 21, 22, 23, 0, 1, 2, 3, 4]) if night else rng.integers(6, 18))
    stamp = (f"CAM{int(rng.integers(1, 40)):02d} 2016-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}",
             hour * 3600 + int(rng.integers(3600)))  # fmt: skip
    with_stamp = night or rng.random() < 0.4
    actors = sorted((_actor(c, rng, width, height, fps, n_frames) for c in classes if c != BLANK),
                    key=lambda a: float(a.ys.mean()))  # far (higher up) first  # fmt: skip
    ramp = np.arange(256, dtype=np.float32)
    for i in range(n_frames):
        frame = bg.copy()
        for a in actors:
            sprite, mask = a.poses[a.pose_idx[i]]
            _paste(frame, sprite, mask, a.xs[i], a.ys[i])
        (dx, dy) = shift[i]
        cv2.copyTo(leaves[dy : dy + height, dx : dx + width], leaf_mask[dy : dy + height, dx : dx + width], frame)
        frame = cv2.LUT(frame, np.clip(ramp * gain[i], 0, 255).astype(np.uint8))
        if night:
            frame = cv2.multiply(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), flash, scale=1 / 128)
        frame = cv2.add(frame, noise[i % 3])
        if with_stamp:
            _put_stamp(frame, stamp[0], stamp[1] + int(t[i]))
        yield frame


def _put_stamp(frame: np.ndarray, prefix: str, second: int) -> None:
    s, h = second % 86400, frame.shape[0]
    text = f"{prefix} {s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"
    org, scale = (max(2, h // 60), h - max(4, h // 30)), h / 600
    black, white = (0, 255) if frame.ndim == 2 else ((0, 0, 0), (255, 255, 255))
    cv2.putText(frame, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, black, 3)
    cv2.putText(frame, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, white, 1, cv2.LINE_AA)


def _encode(path: Path, frames: Iterator[np.ndarray], *, width: int, height: int, fps: float,
            codec: str | None) -> None:  # fmt: skip
    """Encode to a temporary sibling and rename, so a clip file is either whole or absent."""
    if width % 2 or height % 2:
        raise ValueError(f"width and height must be even for yuv420p, got {width}x{height}")
    codec = codec or _CODEC_BY_EXT.get(path.suffix.lower())
    if codec is None:
        raise ValueError(f"no default codec for extension {path.suffix!r}; pass codec=")
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    rate = Fraction(fps).limit_denominator(1001)
    try:
        with av.open(str(tmp), "w", options={"fflags": "+bitexact"}) as container:  # bitexact: no random MKV UIDs
            stream = container.add_stream(codec, rate=rate)
            assert isinstance(stream, av.VideoStream)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.thread_count = 1  # libx264 output is reproducible only single-threaded
            if codec == "libx264":
                stream.options = {"preset": "superfast", "crf": "26"}
            else:
                stream.codec_context.bit_rate = int(max(2e5, 0.12 * width * height * fps))
            for i, arr in enumerate(frames):
                rgb = cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB) if arr.ndim == 2 else arr
                # OpenCV's I420 uses the same BT.601 limited range as swscale's default and is ~10x faster.
                yuv = np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420), np.uint8)
                frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
                frame.pts, frame.time_base = i, 1 / rate
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_clip(path: Path, *, classes: Sequence[str], seed: int, width: int, height: int, fps: float,
               seconds: float, night: bool = False, codec: str | None = None) -> None:  # fmt: skip
    """Write one synthetic camera-trap clip of ``round(fps * seconds)`` frames.

    ``classes`` are CLASS_NAMES entries (``[]`` or ``["blank"]`` for an empty scene). The codec follows the
    extension unless given (.mp4/.mkv/.mov H.264, .avi MPEG-4, .asf MS-MPEG4v3, .wmv WMV2).
    """
    unknown = [c for c in classes if c not in CLASS_NAMES]
    if unknown:
        raise ValueError(f"unknown classes {unknown}; allowed: {list(CLASS_NAMES)}")
    n = max(1, round(fps * seconds))
    frames = _render(classes, seed=seed, width=width, height=height, fps=fps, n_frames=n, night=night)
    _encode(Path(path), frames, width=width, height=height, fps=fps, codec=codec)


def write_static_clip(path: Path, *, width: int, height: int, fps: float, seconds: float,
                      color: tuple[int, int, int] = (90, 120, 60)) -> None:  # fmt: skip
    """Write a clip whose frames are all one flat RGB colour: zero motion, for motion-feature tests."""
    frame = np.empty((height, width, 3), np.uint8)
    frame[:] = color
    n = max(1, round(fps * seconds))
    _encode(Path(path), (frame for _ in range(n)), width=width, height=height, fps=fps, codec=None)


# ---------------------------------------------------------------- dataset


def _sample_labels(rng: np.random.Generator) -> set[str]:
    if rng.random() < BLANK_SHARE:
        return {BLANK}
    names, weights = list(CLASS_PRIORS), np.array(list(CLASS_PRIORS.values()))
    first = names[rng.choice(len(names), p=weights / weights.sum())]
    if rng.random() >= MULTI_LABEL_SHARE:
        return {first}
    weights[names.index(first)] = 0
    return {first, names[rng.choice(len(names), p=weights / weights.sum())]}


def _cover(labels: list[set[str]], idx: list[int], need: int, classes: Sequence[str],
           rng: np.random.Generator) -> None:  # fmt: skip
    """Relabel clips among ``idx`` until each class occurs ``need`` times there, taking only donor clips whose
    classes stay at or above ``need`` (best effort when there are too few clips)."""
    counts = Counter(c for i in idx for c in labels[i])
    for cls in sorted(classes, key=lambda c: counts[c]):
        while counts[cls] < need:
            donors = [i for i in idx if cls not in labels[i] and all(counts[c] > need for c in labels[i])]
            if not donors:
                break
            i = donors[int(rng.integers(len(donors)))]
            counts.subtract(labels[i])
            labels[i] = {cls}
            counts[cls] += 1


def _plan(n_videos: int, test_fraction: float, seed: int) -> list[_ClipPlan]:
    """Every random choice of the dataset, made up front in one process so that n_jobs changes nothing."""
    rng = np.random.default_rng(seed)
    n_train = n_videos - round(n_videos * test_fraction)
    labels = [_sample_labels(rng) for _ in range(n_videos)]
    _cover(labels, list(range(n_train)), 2 if n_videos >= 200 else 1, CLASS_NAMES, rng)
    missing = [c for c in CLASS_NAMES if not any(c in s for s in labels)]
    _cover(labels, list(range(n_train, n_videos)), 1, missing, rng)
    alphabet, stems = np.array(list("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")), set()
    plans = []
    for i, classes in enumerate(labels):
        while (stem := "".join(rng.choice(alphabet, 10))) in stems:
            pass
        stems.add(stem)
        width, height = _RESOLUTIONS[rng.choice(len(_RESOLUTIONS), p=_RESOLUTION_P)]
        fps = float(rng.choice(_FPS, p=_FPS_P))
        n_frames = max(1, round(fps * rng.uniform(2, 12)))
        p_night = np.mean([_BLANK_NIGHT if c == BLANK else _DESIGNS[c].night for c in classes])
        ext = _EXTS[rng.choice(len(_EXTS), p=_EXT_P)]
        plans.append(_ClipPlan(stem + ext, SPLIT_TRAIN if i < n_train else SPLIT_TEST,
                               tuple(c for c in CLASS_NAMES if c in classes), int(rng.integers(2**31)), width,
                               height, fps, n_frames / fps, bool(rng.random() < p_night)))  # fmt: skip
    return plans


def _write_plan(plan: _ClipPlan, videos_dir: Path) -> None:
    write_clip(videos_dir / plan.filename, classes=plan.classes, seed=plan.seed, width=plan.width,
               height=plan.height, fps=plan.fps, seconds=plan.seconds, night=plan.night)  # fmt: skip


def _write_all(plans: Sequence[_ClipPlan], videos_dir: Path, n_jobs: int) -> None:
    order = sorted(plans, key=lambda p: -p.width * p.height * p.fps * p.seconds)  # longest first balances the pool
    if n_jobs <= 1:
        for p in order:
            _write_plan(p, videos_dir)
        return
    # spawn, not fork: callers may hold threads (Dask clients); cv2 threads off in workers to avoid oversubscription
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(n_jobs, mp_context=ctx, initializer=cv2.setNumThreads, initargs=(1,)) as pool:
        futures = [pool.submit(_write_plan, p, videos_dir) for p in order]
        try:
            for future in futures:
                future.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def _labels_csv(plans: Sequence[_ClipPlan], value: float | None = None) -> str:
    rows = [[p.filename, *[int(c in p.classes) if value is None else value for c in CLASS_NAMES]]
            for p in sorted(plans, key=lambda p: p.filename)]  # fmt: skip
    return pd.DataFrame(rows, columns=[FILENAME, *CLASS_NAMES]).to_csv(index=False)


def generate_demo_dataset(out_dir: Path, *, n_videos: int = 400, test_fraction: float = 0.25, seed: int = 0,
                          n_jobs: int = 1) -> DemoDataset:  # fmt: skip
    """Write a synthetic dataset in the Pri-matrix layout under ``out_dir`` and return its paths.

    Deterministic in ``seed`` (labels, file names and, with these encoder settings, file bytes) whatever
    ``n_jobs``. An existing MANIFEST.json is removed first and rewritten last; other files are overwritten, never
    deleted. Every class occurs at least twice among train clips when ``n_videos >= 200``, else at least once
    overall when there are enough clips. ``n_jobs > 1`` encodes in a spawned process pool.
    """
    if n_videos < 1 or not 0 <= test_fraction < 1:
        raise ValueError(f"need n_videos >= 1 and 0 <= test_fraction < 1, got {n_videos}, {test_fraction}")
    ds = DemoDataset.at(Path(out_dir))
    ds.manifest.unlink(missing_ok=True)
    ds.videos_dir.mkdir(parents=True, exist_ok=True)
    plans = _plan(n_videos, test_fraction, seed)
    _write_all(plans, ds.videos_dir, n_jobs)
    train, test = [p for p in plans if p.split == SPLIT_TRAIN], [p for p in plans if p.split == SPLIT_TEST]
    _write_text(ds.train_labels, _labels_csv(train))
    _write_text(ds.submission_format, _labels_csv(test, 0.5))
    _write_text(ds.test_labels, _labels_csv(test))
    manifest = {
        "generator": __name__, "generator_version": GENERATOR_VERSION, "seed": seed, "n_videos": n_videos,
        "test_fraction": test_fraction,
        "counts": {SPLIT_TRAIN: len(train), SPLIT_TEST: len(test), "night": sum(p.night for p in plans),
                   "multi_label": sum(len(p.classes) > 1 for p in plans),
                   "containers": dict(Counter(Path(p.filename).suffix for p in plans))},
        "class_counts": {s: {c: sum(c in p.classes for p in ps) for c in CLASS_NAMES}
                         for s, ps in ((SPLIT_TRAIN, train), (SPLIT_TEST, test))},
        "clips": [asdict(p) | {FILENAME: p.filename, "n_frames": round(p.fps * p.seconds)} for p in plans],
    }  # fmt: skip
    _write_text(ds.manifest, json.dumps(manifest, indent=1))
    return ds


def demo_dataset_complete(out_dir: Path, *, seed: int | None = None, n_videos: int | None = None) -> bool:
    """True when ``out_dir`` holds a finished dataset of this generator version (and the given seed and size).

    Checks the manifest (written last), the three CSVs, and that every clip it lists exists.
    """
    ds = DemoDataset.at(Path(out_dir))
    try:
        manifest = json.loads(ds.manifest.read_text())
        clips = [ds.videos_dir / c[FILENAME] for c in manifest["clips"]]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    wanted = {"generator_version": GENERATOR_VERSION, "seed": seed, "n_videos": n_videos}
    if any(v is not None and manifest.get(k) != v for k, v in wanted.items()):
        return False
    return all(p.is_file() for p in [ds.train_labels, ds.submission_format, ds.test_labels, *clips])
