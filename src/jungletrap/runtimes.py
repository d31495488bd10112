"""Inference runtimes for a built backbone: torch eager, or the same network compiled by OpenVINO on CPU workers.

Why OpenVINO: on a CPU worker the embed stage is bound by the model, and OpenVINO's CPU plugin runs the same
weights 2-4x faster than torch eager on one thread (``bench/embed.py`` has the figures), with features equal
to torch's within float32 rounding (``tests/test_runtime.py`` checks every backbone on the real clips:
max abs diff <= 1e-3, cosine >= 0.9999). So the runtime is a performance setting: it is not in the result hash.

``embed.runtime: auto`` picks OpenVINO on CPU workers where the package is installed (a default dependency on
every platform it has wheels for) and torch on GPU workers; where it is missing, ``auto`` says so once and uses
torch. The network is converted from the torch module (``ov.convert_model`` with an example input, so every
registered backbone converts the same way) and compiled once per worker process by the embed UDF's model
cache, with the worker's thread count. Settings pinned on purpose:

- ``INFERENCE_PRECISION_HINT: f32``: the CPU plugin otherwise runs bfloat16 on CPUs that have it (AMX,
  AVX512-BF16), and features would depend on the worker's CPU model;
- ``ENABLE_CPU_PINNING: False``: several Dask workers share a machine, and each pinning its threads would put
  them on the same cores;
- one stream, latency hint: the worker's threads serve one batch at a time, as torch's do.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import warnings
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

__all__ = ["RUNTIMES", "FeatureModel", "compile_backbone", "openvino_available", "resolve_runtime"]

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "openvino")
_fallback_said = False


class FeatureModel(Protocol):
    """A backbone ready to run: normalised float ``(N, 3, H, W)`` on the worker's device → float32 features."""

    runtime: str

    def __call__(self, x: torch.Tensor) -> np.ndarray: ...


def openvino_available() -> bool:
    """Whether the ``openvino`` package can be imported here (without importing it)."""
    return importlib.util.find_spec("openvino") is not None


def resolve_runtime(runtime: str, device: str) -> str:
    """The runtime a worker uses: ``auto`` is OpenVINO on a CPU device where installed, else torch."""
    global _fallback_said
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; allowed: {', '.join(RUNTIMES)}")
    if runtime == "openvino" and not openvino_available():
        raise RuntimeError("embed.runtime=openvino but the openvino package is not installed on this worker")
    if runtime != "auto":
        return runtime
    if device != "cpu":
        return "torch"
    if openvino_available():
        return "openvino"
    if not _fallback_said:
        log.warning("embed.runtime=auto: openvino is not installed here, so CPU inference uses torch (2-4x slower; "
                    "pip install openvino)")
        _fallback_said = True
    return "torch"


class _TorchModel:
    """The module as built, under inference mode (and bfloat16 autocast on CUDA)."""

    runtime = "torch"

    def __init__(self, module: nn.Module, device: str) -> None:
        self.module = module
        self.cuda = device.startswith("cuda")

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.cuda):
            return self.module(x).float().cpu().numpy()


class _OpenVINOModel:
    """The module converted and compiled for OpenVINO's CPU plugin, batch dimension dynamic, H and W fixed.

    Infer requests are not thread-safe, so each thread of the worker gets its own (one per Dask thread).
    """

    runtime = "openvino"

    def __init__(self, module: nn.Module, *, input_size: int, threads: int) -> None:
        import openvino as ov

        example = torch.zeros(1, 3, input_size, input_size)
        with warnings.catch_warnings():  # tracing warns about shape arithmetic (TF SAME padding): H, W are fixed
            warnings.simplefilter("ignore")
            converted = ov.convert_model(module, example_input=example, input=[(-1, 3, input_size, input_size)])
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING": False,
                                  "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                                  "INFERENCE_NUM_THREADS": max(1, threads)}
        self.compiled = ov.Core().compile_model(converted, "CPU", config)
        self._local = threading.local()

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        batch = np.ascontiguousarray(x.detach().cpu().numpy())  # channels_last in torch → NCHW for OpenVINO
        return np.asarray(request.infer({0: batch}, share_inputs=True)[0], dtype=np.float32)


def compile_backbone(module: nn.Module, *, runtime: str, device: str, input_size: int, threads: int) -> FeatureModel:
    """Make ``module`` (from :func:`jungletrap.backbones.build_backbone`) ready for ``runtime`` (resolved: torch
    or openvino). OpenVINO converts and compiles here, seconds for ResNet-152: call once per worker process."""
    if runtime == "openvino":
        if device != "cpu":
            raise ValueError(f"embed.runtime=openvino runs on the CPU, not on {device}")
        return _OpenVINOModel(module, input_size=input_size, threads=threads)
    return _TorchModel(module, device)
