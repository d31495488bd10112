"""Typed job configuration: pydantic v2 models validated from YAML plus ``--set`` overrides.

The config is resolved once by the job (file, then overrides), validated before any work, saved in the
run directory, and passed down. No other module reads YAML or environment variables.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if TYPE_CHECKING:
    from jungletrap.storage import RunPath

__all__ = [
    "ConfigError",
    "JobConfig",
    "RunConfig",
    "DataConfig",
    "ClusterConfig",
    "CatalogConfig",
    "EmbedConfig",
    "FeaturesConfig",
    "XGBConfig",
    "HeadConfig",
    "TrainConfig",
    "EnsembleConfig",
    "load_config",
    "apply_overrides",
    "config_hash",
    "save_config",
]

STAGES: tuple[str, ...] = ("catalog", "embed", "features", "train", "ensemble")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class RunConfig(_Section):
    """Where outputs go and the global seed. ``root`` may be a local path or any fsspec URL (``s3://...``)."""

    name: str = Field("default", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    root: str = "runs"
    seed: int = 0
    strict: bool = False
    #: The embed stage stops (exit 1) once more than this share of the catalog's clips are error rows.
    max_failed_fraction: float = Field(0.05, ge=0.0, le=1.0)
    storage_options: dict[str, Any] = Field(default_factory=dict)


VARIANT_FIELD = "{variant}"


class DataConfig(_Section):
    """Inputs in the competition layout: a videos root plus two CSVs with ``filename`` + 24 class columns.

    Every location may be a local path or an fsspec URL; ``storage_options`` apply to the remote ones.
    ``{variant}`` in ``videos`` is replaced by ``variant`` (the competition's ``full`` clips or its 64x64
    ``micro`` copies, same filenames), so ``--set data.variant=micro`` switches the whole run.
    """

    videos: str = "data/demo/videos"
    labels: str = "data/demo/train_labels.csv"
    submission_format: str = "data/demo/submission_format.csv"
    test_labels: str | None = None
    variant: Literal["full", "micro"] = "full"
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _variant_placeholder(self) -> DataConfig:
        if self.variant != "full" and VARIANT_FIELD not in self.videos:
            raise ValueError(f"data.variant={self.variant} needs {VARIANT_FIELD} in data.videos (e.g. "
                             f"s3://bucket/primatrix/{VARIANT_FIELD}), else the full clips would be used")
        return self

    def videos_root(self) -> str:
        """``videos`` with ``{variant}`` filled in."""
        return self.videos.replace(VARIANT_FIELD, self.variant)


class ClusterConfig(_Section):
    """Which Dask cluster the job uses. ``auto`` picks CUDA when torch sees a GPU and dask-cuda is installed."""

    kind: Literal["auto", "cpu", "cuda", "address"] = "auto"
    address: str | None = None
    scheduler_file: str | None = None
    n_workers: int = Field(2, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    memory_limit: str = "auto"
    host: str = "127.0.0.1"
    dashboard_address: str = "127.0.0.1:0"
    connect_timeout_s: float = Field(30.0, gt=0)
    #: After Ctrl-C/SIGTERM, how long closing the cluster may take before the command kills what it started.
    stop_timeout_s: float = Field(60.0, gt=0)
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    @model_validator(mode="after")
    def _address_given(self) -> ClusterConfig:
        if self.kind == "address" and not (self.address or self.scheduler_file):
            raise ValueError("cluster.kind=address needs cluster.address or cluster.scheduler_file")
        return self

    @model_validator(mode="after")
    def _tls_complete(self) -> ClusterConfig:
        if (self.tls_ca_file or self.tls_cert_file or self.tls_key_file) and not (
                self.tls_ca_file and self.tls_cert_file):
            raise ValueError("TLS needs cluster.tls_ca_file and cluster.tls_cert_file (plus cluster.tls_key_file "
                             "unless the certificate file also holds the key)")
        return self

    def uses_tls(self) -> bool:
        """True when TLS certificates are configured (they are used for ``tls://`` schedulers)."""
        return bool(self.tls_ca_file and self.tls_cert_file)


class CatalogConfig(_Section):
    """Listing videos, joining labels and assigning folds and partitions."""

    extensions: list[str] = Field(default_factory=lambda: [".mp4", ".avi", ".asf", ".mkv", ".mov", ".wmv"])
    videos_per_partition: int = Field(32, ge=1)
    partition_bytes: int | None = Field(256 * 2**20, ge=0)
    n_folds: int = Field(5, ge=2, le=20)


class EmbedConfig(_Section):
    """Frame sampling (in time, not frame index) and the backbone run on every sampled frame."""

    backbone: str = "efficientnet_lite0"
    backbones: list[str] | None = Field(None, min_length=1)
    sample_fps: float = Field(3.0, gt=0, le=120)
    max_seconds: float = Field(15.0, gt=0)
    n_frames: int | None = Field(None, ge=1, le=1024)
    batch_size: int | None = Field(None, ge=1, le=4096)
    dtype: str = "float16"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    runtime: Literal["auto", "torch", "openvino"] = "auto"
    weights: str | dict[str, str | None] | None = None
    decode_timeout_s: float = Field(120.0, gt=0)
    prefetch_videos: int = Field(4, ge=1, le=64)
    decode_threads: int = Field(2, ge=1, le=64)
    decode_processes: int | None = Field(None, ge=0, le=128)
    codec_threads: int = Field(0, ge=0, le=64)
    input_size: int | None = Field(None, ge=32, le=1024)
    retries: int = Field(2, ge=0, le=10)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        from jungletrap.backbones import BACKBONES

        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(sorted(BACKBONES))}")
        return name

    @field_validator("backbones")
    @classmethod
    def _known_backbones(cls, names: list[str] | None) -> list[str] | None:
        if names is None:
            return None
        for name in names:
            cls._known_backbone(name)
        if len(set(names)) != len(names):
            raise ValueError(f"backbones must not repeat a name, got {names}")
        return names

    @model_validator(mode="after")
    def _one_list_of_backbones(self) -> EmbedConfig:
        """``backbones`` wins over the ``backbone`` shorthand; both given, ``backbone`` must be its first entry."""
        if self.backbones and self.backbone != self.backbones[0]:
            if "backbone" in self.model_fields_set:
                raise ValueError(f"backbone {self.backbone!r} and backbones {self.backbones} disagree: give only "
                                 "backbones (its first entry is the main one), or backbone alone")
            # backbone is the main one: a saved config (which writes both keys) must load again
            object.__setattr__(self, "backbone", self.backbones[0])  # (no validate_assignment round trip)
        names = self.backbone_names
        if isinstance(self.weights, str) and self.weights != "random" and len(names) > 1:
            raise ValueError(f"weights {self.weights!r} cannot serve several backbones {names}: give a mapping "
                             "backbone -> weights (null = published, random, or a path/URL)")
        if isinstance(self.weights, dict):
            unknown = sorted(set(self.weights) - set(names))
            if unknown:
                raise ValueError(f"weights names backbones not embedded: {unknown} (backbones: {names})")
            if any(w is not None and not w for w in self.weights.values()):
                raise ValueError("weights: an empty string is not a path; use null for the published weights")
        elif isinstance(self.weights, str) and not self.weights:
            raise ValueError("weights: an empty string is not a path; use null for the published weights")
        return self

    @property
    def backbone_names(self) -> list[str]:
        """Every backbone this run embeds, the main one (``backbone``) first."""
        return list(self.backbones) if self.backbones else [self.backbone]

    def weights_for(self, backbone: str) -> str | None:
        """``weights`` for one backbone: a mapping's entry, else the single value (null = published weights)."""
        if isinstance(self.weights, dict):
            return self.weights.get(backbone)
        return self.weights

    @field_validator("dtype")
    @classmethod
    def _stored_dtype(cls, dtype: str) -> str:
        # The embeddings' Parquet schema is float16; a float32 setting was silently cast back to it.
        if dtype != "float16":
            raise ValueError(f"only float16 is supported (embeddings are stored as float16), got {dtype!r}")
        return dtype

    @model_validator(mode="after")
    def _runtime_usable(self) -> EmbedConfig:
        """``openvino`` runs on the CPU and needs its package: say so before any work, not on every worker."""
        from jungletrap.runtimes import openvino_available

        if self.runtime == "openvino" and self.device == "cuda":
            raise ValueError("runtime=openvino runs on CPU workers and cannot be combined with device=cuda "
                             "(use runtime=auto: OpenVINO on CPU workers, torch on GPU workers)")
        if self.runtime == "openvino" and not openvino_available():
            raise ValueError("runtime=openvino needs the openvino package, which is not installed here "
                             "(pip install openvino; or use runtime=auto or runtime=torch)")
        return self


class FeaturesConfig(_Section):
    """How frame embeddings are pooled over time into one row per video."""

    pooling: list[Literal["mean", "max", "min", "std", "maxmin", "p10", "p50", "p90"]] = Field(
        default_factory=lambda: ["mean", "max"], min_length=1)
    pca_components: int = Field(0, ge=0, le=1024)
    pca_max_rows: int = Field(20000, ge=10)


class XGBConfig(_Section):
    """Distributed XGBoost (``xgboost.dask``) on the feature table, one model per fold."""

    n_estimators: int = Field(300, ge=1)
    learning_rate: float = Field(0.1, gt=0, le=1)
    max_depth: int = Field(4, ge=1, le=16)
    min_child_weight: float = Field(1.0, ge=0)
    subsample: float = Field(1.0, gt=0, le=1)  # < 1 makes xgboost.dask depend on how rows sit on workers
    colsample_bytree: float = Field(0.5, gt=0, le=1)
    reg_lambda: float = Field(1.0, ge=0)
    early_stopping_rounds: int = Field(30, ge=1)
    multi_strategy: Literal["one_output_per_tree", "multi_output_tree"] = "one_output_per_tree"
    max_bin: int = Field(256, ge=2)  # histogram bins per feature: every tree node allreduces features x bins
    min_rows_per_worker: int = Field(16000, ge=1)  # a fold trains on as many workers as hold this many rows each


class HeadConfig(_Section):
    """The seed's neural head: attention + max-min pooling over frames plus a metadata MLP."""

    pooling: Literal["attention_maxmin", "gru"] = "attention_maxmin"
    hidden: int = Field(128, ge=4)
    dropout: float = Field(0.3, ge=0, lt=1)
    max_frames: int = Field(45, ge=1)
    epochs: int = Field(40, ge=1)
    patience: int = Field(6, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    torch_threads: int = Field(1, ge=1)
    shuffle_buffer: int = Field(1024, ge=1)  # clips held for shuffling while streaming (bounds a fold's memory)


class TrainConfig(_Section):
    """Which models to train over the folds."""

    models: list[Literal["xgb", "head"]] = Field(default_factory=lambda: ["xgb", "head"], min_length=1)
    early_stopping_fraction: float = Field(0.125, gt=0, le=0.5)  # fit rows of each fold set aside to stop on
    refit: bool = True  # refit each fold's models on all its training rows for the rounds/epochs stopping chose
    refit_scale: bool = False  # refit for the chosen count / (1 - early_stopping_fraction) (more rows, more steps)
    xgb: XGBConfig = Field(default_factory=XGBConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)


class EnsembleConfig(_Section):
    """Blending of the models' predictions; fitted on out-of-fold predictions only."""

    method: Literal["auto", "mean", "weights", "shared_stacker", "stacker"] = "auto"
    clip: Literal["auto"] | float = "auto"

    @field_validator("clip")
    @classmethod
    def _clip_range(cls, value: str | float) -> str | float:
        if value != "auto" and not 0 <= float(value) < 0.5:
            raise ValueError(f"clip must be 'auto' or a number in [0, 0.5), got {value!r}")
        return value


class JobConfig(_Section):
    """The whole job; each section configures one part of the pipeline."""

    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    catalog: CatalogConfig = Field(default_factory=CatalogConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig)

    def run_dir(self) -> RunPath:
        """``run.root/run.name``: a local ``Path``, or a ``UPath`` carrying ``run.storage_options``."""
        from jungletrap.storage import join_location, run_path

        return run_path(join_location(self.run.root, self.run.name), self.run.storage_options)

    def public_dump(self) -> dict[str, Any]:
        """The config as saved with a run: storage options reduced to their non-secret keys."""
        from jungletrap.storage import public_storage_options

        data = self.model_dump(mode="json")
        for section in ("run", "data"):
            data[section]["storage_options"] = public_storage_options(data[section]["storage_options"])
        return data


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif "storage_options" in key.split("."):  # may hold credentials: never echo the value
            lines.append(f"  {key}: {item['msg']}")
        else:
            lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def _parse_value(text: str) -> Any:
    """Parse an override value as YAML so ``3``, ``1e-3``, ``true``, ``[a, b]`` and ``null`` get their types."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw config mapping (before validation)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, value = item.split("=", 1)
        parts = [p for p in dotted.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r} names no key")
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return raw


def load_config(path: str | Path | RunPath | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML file (or nothing: the defaults), apply overrides, validate; raise :class:`ConfigError`.

    ``path`` may be a ``UPath`` (a run's ``config.yaml`` on an object store).
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = path if isinstance(path, Path) or hasattr(path, "read_text") else Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections, not {type(loaded).__name__}")
        raw = loaded or {}
    raw = apply_overrides(raw, list(overrides or []))
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def config_hash(section: BaseModel | dict[str, Any]) -> str:
    """A short stable hash of a config section, used to tell whether an artifact was made by it."""
    data = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_config(cfg: JobConfig, path: RunPath) -> None:
    """Write the resolved config as YAML (the run's record of what made its outputs).

    Storage options are saved without secrets (:meth:`JobConfig.public_dump`).
    """
    from jungletrap.storage import write_text_atomic

    write_text_atomic(yaml.safe_dump(cfg.public_dump(), sort_keys=False), path)
