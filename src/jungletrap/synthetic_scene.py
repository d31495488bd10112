"""Drawing for the synthetic camera-trap demo: the per-class design table, the forest scene and the animals.

Why a separate module: :mod:`jungletrap.synthetic` plans a dataset and encodes and writes it; this module only
turns a clip's classes and seed into frames (:func:`_render`), so the drawing can change without touching the
dataset contract. Frames are drawn with numpy and OpenCV only. Everything here is package-internal: the names in
``__all__`` are the ones :mod:`jungletrap.synthetic` uses; callers should go through that module's public API.
Randomness comes only from the ``seed`` given to :func:`_render`, so one seed always yields the same frames.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import cv2
import numpy as np

from jungletrap.schema import CLASS_NAMES

__all__ = ["BLANK", "_DESIGNS", "_Design", "_render"]

BLANK = CLASS_NAMES[CLASS_NAMES.index("blank")]
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
# columns: shape size aspect colour pattern pattern-colour leg head head-colour tail extra speed bob night
_DESIGNS: dict[str, _Design] = {
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
    if d.shape == "upright":  # L is the whole figure, the torso B wide; trousers in the pattern colour
        top, hip, leg = cy - L * 0.25, cy + L * 0.15, L * 0.45
        for k, dx in ((0, -B / 4), (np.pi, B / 4)):
            swing = np.sin(phase + k) * leg * 0.35
            cv.line([(cx + dx, hip), (cx + dx + swing, hip + leg)], B * 0.35, pat_c)
            cv.line([(cx + dx * 2.2, top + B * 0.2), (cx + dx * 2.2 - swing * 0.8, hip)], B * 0.22, head_c)

        def body(t: np.ndarray, c: Any) -> Any:
            return cv2.rectangle(t, (int(cx - B / 2), int(top)), (int(cx + B / 2), int(hip)), c, -1)

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

            def body(t: np.ndarray, c: Any) -> Any:
                return cv2.ellipse(t, (int(cx), int(cy)), (int(L / 2), int(B / 2)), 0, 0, 360, c, -1)

        else:

            def body(t: np.ndarray, c: Any) -> Any:
                return cv2.fillPoly(t, [poly], c)

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


# ---------------------------------------------------------------- frames


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
