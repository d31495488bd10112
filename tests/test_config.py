"""Typed config: defaults documented in conf/default.yaml, overrides, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jungletrap.config import ConfigError, JobConfig, apply_overrides, config_hash, load_config

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_default_yaml_documents_exactly_the_model_defaults() -> None:
    documented = JobConfig.model_validate(yaml.safe_load((CONF / "default.yaml").read_text()))
    assert documented.model_dump() == JobConfig().model_dump()


def _keys(data: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in data.items():
        out.add(prefix + key)
        if isinstance(value, dict):
            out |= _keys(value, prefix + key + ".")
    return out


def test_default_yaml_lists_every_key() -> None:
    documented = _keys(yaml.safe_load((CONF / "default.yaml").read_text()))
    assert documented == _keys(JobConfig().model_dump())


@pytest.mark.parametrize("name", ["default.yaml", "demo.yaml", "primatrix.yaml"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_config(CONF / name)
    assert cfg.run.name


def test_primatrix_has_the_seed_sampling() -> None:
    cfg = load_config(CONF / "primatrix.yaml")
    assert cfg.embed.sample_fps * cfg.embed.max_seconds == 45
    assert cfg.catalog.n_folds == 5


def test_overrides_parse_types() -> None:
    cfg = load_config(CONF / "demo.yaml", ["embed.sample_fps=2", "train.models=[xgb]", "embed.n_frames=null",
                                           "run.strict=true"])
    assert cfg.embed.sample_fps == 2.0
    assert cfg.train.models == ["xgb"]
    assert cfg.embed.n_frames is None
    assert cfg.run.strict is True


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("embed.nope=1", "embed.nope: unknown key"),
        ("embed.sample_fps=-3", "embed.sample_fps"),
        ("embed.n_frames=-1", "embed.n_frames"),
        ("embed.backbone=vgg99", "allowed: efficientnet_lite0"),
        ("embed.dtype=float32", "embed.dtype: Value error, only float16 is supported"),
        ("embed.runtime=tensorrt", "embed.runtime"),
        ("catalog.n_folds=one", "catalog.n_folds"),
        ("cluster.kind=gpu", "cluster.kind"),
        ("ensemble.clip=0.7", "ensemble.clip"),
        ("bogus.key=1", "bogus: unknown key"),
    ],
)
def test_bad_values_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CONF / "demo.yaml", [override])
    assert needle in str(err.value)


def test_override_without_equals_is_rejected() -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["embed.sample_fps"])


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_config_hash_changes_with_values() -> None:
    a, b = JobConfig(), load_config(None, ["embed.sample_fps=1"])
    assert config_hash(a.embed) != config_hash(b.embed)
    assert config_hash(a.embed) == config_hash(JobConfig().embed)


def test_storage_options_never_saved_or_hashed_with_secrets(tmp_path: Path) -> None:
    from jungletrap.config import save_config
    from jungletrap.pipeline import stage_hashes

    secret = {"endpoint_url": "http://127.0.0.1:9000", "key": "AKIAEXAMPLE", "secret": "s3cr3t-value",
              "token": "tok-value", "profile": "lab", "client_kwargs": {"region_name": "eu-west-1",
                                                                       "aws_secret_access_key": "nested-secret"},
              "unknown_option": "maybe-a-secret"}
    cfg = load_config(CONF / "demo.yaml").model_copy(deep=True)
    cfg.data.storage_options = dict(secret)
    cfg.run.storage_options = dict(secret)
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    for value in ("AKIAEXAMPLE", "s3cr3t-value", "tok-value", "nested-secret", "maybe-a-secret"):
        assert value not in text
    saved = load_config(tmp_path / "config.yaml")
    assert saved.data.storage_options == {"endpoint_url": "http://127.0.0.1:9000", "profile": "lab",
                                          "client_kwargs": {"region_name": "eu-west-1"}}
    other = cfg.model_copy(deep=True)
    other.data.storage_options = {**secret, "secret": "another"}
    assert stage_hashes(other) == stage_hashes(cfg)  # credentials do not change what a stage makes
    other.data.storage_options = {**secret, "endpoint_url": "http://127.0.0.1:9001"}
    assert stage_hashes(other)["catalog"] != stage_hashes(cfg)["catalog"]


def test_bad_storage_options_error_does_not_echo_the_value() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CONF / "demo.yaml", ["data.storage_options=key:AKIAEXAMPLE"])
    assert "data.storage_options" in str(err.value) and "AKIAEXAMPLE" not in str(err.value)


def test_partition_bytes_zero_or_null_means_by_count() -> None:
    assert JobConfig().catalog.partition_bytes == 256 * 2**20
    assert load_config(None, ["catalog.partition_bytes=0"]).catalog.partition_bytes == 0
    assert load_config(None, ["catalog.partition_bytes=null"]).catalog.partition_bytes is None
    with pytest.raises(ConfigError, match="catalog.partition_bytes"):
        load_config(None, ["catalog.partition_bytes=-1"])


def test_micro_variant_needs_the_placeholder() -> None:
    with pytest.raises(ConfigError, match="variant"):
        load_config(CONF / "demo.yaml", ["data.variant=micro"])
    cfg = load_config(CONF / "primatrix.yaml", ["data.variant=micro"])
    assert cfg.data.videos_root() == "/data/primatrix/micro"


def test_backbones_alone_make_their_first_the_main_one_and_a_saved_config_loads_again(tmp_path: Path) -> None:
    from jungletrap.config import save_config

    cfg = JobConfig.model_validate({"embed": {"backbones": ["efficientnet_lite1", "efficientnet_lite2"]}})
    assert cfg.embed.backbone == "efficientnet_lite1"
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").embed == cfg.embed
    with pytest.raises(ValueError, match="disagree"):
        JobConfig.model_validate({"embed": {"backbone": "efficientnet_lite0", "backbones": ["efficientnet_lite1"]}})
