"""Several backbones in one run: features with every backbone's pooled columns, a PCA and a head per backbone,
XGBoost over all of them, and an ensemble (and ``predict``) over every model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from distributed import Client
from jungletrap.udfs.embed import EMBED_SCHEMA
from jungletrap.udfs.features import pooled_names

from jungletrap.cluster import ClusterInfo
from jungletrap.config import FeaturesConfig, JobConfig, load_config
from jungletrap.feature_fit import FeatureTransform
from jungletrap.features import FEATURES_DIR, build_features, read_embedding_part, read_features_meta
from jungletrap.head_stream import META_FEATURES
from jungletrap.pipeline import StageContext, run_pipeline
from jungletrap.predict import score_embedded, trained_settings
from jungletrap.schema import CLASS_NAMES, EMBEDDING, SPLIT, SPLIT_TEST, SPLIT_TRAIN, VIDEO_ID
from jungletrap.storage import read_parquet
from jungletrap.synthetic_embeddings import RehearsalSpec, write_rehearsal
from jungletrap.train import embed_dirs, model_names, prediction_path, read_predictions

MAIN, OTHER = "tiny_cnn", "efficientnet_lite0"  # 64-d and 1280-d: the widths tell the backbones apart
SPEC = RehearsalSpec(n=120, frames=6, seed=5, videos_per_partition=24, backbones=(MAIN, OTHER))
POOLING = ["mean", "max"]
FAST = ["train.xgb.n_estimators=10", "train.xgb.early_stopping_rounds=3", "train.head.epochs=2",
        "train.head.patience=1", "train.head.hidden=8", "features.pca_components=3"]


@pytest.fixture(scope="module")
def rehearsal(dask_client: Client, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("multi") / "run"
    write_rehearsal(dask_client, out, SPEC)
    return out


def _features(client: Client, dirs: dict[str, Path] | Path, out: Path, fit_ids: set[str],
              pca_components: int = 3) -> pd.DataFrame:
    cfg = FeaturesConfig(pooling=POOLING, pca_components=pca_components)
    build_features(client, dirs, out / FEATURES_DIR, cfg, transform_path=out / "features.json", fit_ids=fit_ids)
    return read_parquet(out / FEATURES_DIR)


def _train_ids(run: Path) -> set[str]:
    catalog = read_parquet(run / "catalog.parquet", columns=[VIDEO_ID, SPLIT])
    return set(catalog.loc[catalog[SPLIT] == SPLIT_TRAIN, VIDEO_ID])


def test_rehearsal_writes_every_backbone_with_the_same_rows(rehearsal: Path, dask_client: Client,
                                                            tmp_path: Path) -> None:
    cfg = load_config(rehearsal / "config.yaml")
    assert cfg.embed.backbone_names == [MAIN, OTHER]
    dirs = embed_dirs(cfg, rehearsal)
    main_parts, other_parts = (sorted(d.glob("part-*.parquet")) for d in dirs.values())
    assert [p.name for p in main_parts] == [p.name for p in other_parts] and len(main_parts) == 5
    for a, b in zip(main_parts, other_parts, strict=True):
        assert pq.read_schema(b).remove_metadata().equals(EMBED_SCHEMA)
        x, y = read_embedding_part(a), read_embedding_part(b)
        assert json.loads(pq.read_schema(b).metadata[b"jungletrap"])["feature_dim"] == 1280
        pd.testing.assert_frame_equal(x.drop(columns=[EMBEDDING]), y.drop(columns=[EMBEDDING]))
        assert all(e.size == n * 1280 for e, n in zip(y[EMBEDDING], y["n_frames"], strict=True))
    # the main backbone's parts are those a one-backbone rehearsal of the same size and seed writes
    single = tmp_path / "single"
    write_rehearsal(dask_client, single, RehearsalSpec(n=SPEC.n, dim=64, frames=SPEC.frames, seed=SPEC.seed,
                                                       videos_per_partition=SPEC.videos_per_partition))
    for part in main_parts:  # (error rows name the clip's path, under each run's own directory)
        one = pq.read_table(single / "embeddings" / MAIN / part.name).drop_columns(["error"])
        assert one.replace_schema_metadata(None).equals(pq.read_table(part).drop_columns(["error"])
                                                        .replace_schema_metadata(None))


def test_features_hold_every_backbones_pooled_columns_and_keep_the_single_backbone_ones(
        rehearsal: Path, dask_client: Client, tmp_path: Path) -> None:
    cfg = load_config(rehearsal / "config.yaml")
    dirs, fit_ids = embed_dirs(cfg, rehearsal), _train_ids(rehearsal)
    both = _features(dask_client, dirs, tmp_path / "both", fit_ids)
    single = _features(dask_client, dirs[MAIN], tmp_path / "single", fit_ids)
    others = pooled_names(1280, POOLING, OTHER)
    assert others[0] == f"emb_{OTHER}_mean_0000"
    other_pca = [f"emb_{OTHER}_pca_{k:03d}" for k in range(3)]
    # single: ids, container, pixels, emb_<stat>_<d>, then the fitted relative and emb_pca_<k> columns (3 + 3)
    assert list(both.columns) == [*single.columns[:-6], *others, *single.columns[-6:], *other_pca]
    assert {"emb_mean_0000", "emb_max_0063", "emb_pca_002"} <= set(single.columns)
    pd.testing.assert_frame_equal(both[list(single.columns)], single)  # one backbone's columns: unchanged
    part = read_embedding_part(sorted(dirs[OTHER].glob("part-*.parquet"))[1])
    clip = part[part["status"] == "ok"].iloc[0]
    frames = np.asarray(clip[EMBEDDING], np.float32).reshape(clip["n_frames"], 1280)
    row = both.set_index(VIDEO_ID).loc[clip[VIDEO_ID]]
    np.testing.assert_allclose(row[pooled_names(1280, ["mean"], OTHER)].to_numpy(np.float32), frames.mean(axis=0),
                               rtol=1e-5, atol=1e-5)
    meta = read_features_meta(sorted((tmp_path / "both" / FEATURES_DIR).glob("*.parquet"))[0])
    assert list(meta["other_backbones"]) == [OTHER] and meta["other_backbones"][OTHER]["embed_dim"] == 1280
    assert "other_backbones" not in read_features_meta(sorted((tmp_path / "single" / FEATURES_DIR).glob("*"))[0])


def _scale_test_rows(src: Path, dst: Path, test_ids: set[str]) -> None:
    """A copy of one backbone's parts whose test clips' embeddings are 100 times larger (same metadata)."""
    dst.mkdir(parents=True)
    for part in sorted(src.glob("part-*.parquet")):
        frame = read_embedding_part(part)
        frame[EMBEDDING] = [e * np.float16(100) if v in test_ids else e
                            for v, e in zip(frame[VIDEO_ID], frame[EMBEDDING], strict=True)]
        table = pa.Table.from_pandas(frame[EMBED_SCHEMA.names], schema=EMBED_SCHEMA, preserve_index=False)
        pq.write_table(table.replace_schema_metadata(pq.read_schema(part).metadata), dst / part.name)


@pytest.mark.slow
def test_one_pca_per_backbone_fitted_on_training_rows_only(rehearsal: Path, dask_client: Client,
                                                           tmp_path: Path) -> None:
    cfg = load_config(rehearsal / "config.yaml")
    dirs, fit_ids = embed_dirs(cfg, rehearsal), _train_ids(rehearsal)
    _features(dask_client, dirs, tmp_path / "a", fit_ids)
    fitted = FeatureTransform.load(tmp_path / "a" / "features.json")
    assert [p.prefix for p in fitted.pca] == ["emb_", f"emb_{OTHER}_"]
    assert fitted.pca[0].columns == pooled_names(64, POOLING)
    assert fitted.pca[1].columns == pooled_names(1280, POOLING, OTHER)
    assert all(len(p.components) == 3 for p in fitted.pca)
    catalog = read_parquet(rehearsal / "catalog.parquet", columns=[VIDEO_ID, SPLIT])
    wild = {**dirs, OTHER: tmp_path / "wild" / OTHER}
    _scale_test_rows(dirs[OTHER], wild[OTHER], set(catalog.loc[catalog[SPLIT] == SPLIT_TEST, VIDEO_ID]))
    wild_features = _features(dask_client, wild, tmp_path / "b", fit_ids)
    assert FeatureTransform.load(tmp_path / "b" / "features.json") == fitted  # test rows never enter a fit
    # ...while the transform is applied to them (the PCA columns of a test clip moved with its embeddings)
    test_id = sorted(set(catalog[VIDEO_ID]) - fit_ids)[0]
    a = read_parquet(tmp_path / "a" / FEATURES_DIR).set_index(VIDEO_ID)
    assert not np.allclose(a.loc[test_id, f"emb_{OTHER}_pca_000"],
                           wild_features.set_index(VIDEO_ID).loc[test_id, f"emb_{OTHER}_pca_000"])
    everything = _features(dask_client, wild, tmp_path / "c", set(catalog[VIDEO_ID]))
    assert len(everything) == SPEC.n
    assert FeatureTransform.load(tmp_path / "c" / "features.json").pca[1] != fitted.pca[1]  # (it could differ)


@pytest.fixture(scope="module")
def trained(rehearsal: Path, dask_client: Client) -> Path:
    """The 2-backbone rehearsal after features, train and ensemble (the other tests read only its embeddings)."""
    cfg = load_config(rehearsal / "config.yaml", FAST)
    info = ClusterInfo(kind="local", dashboard_link=None, n_workers=2, gpu=False)
    run_pipeline(StageContext(dask_client, cfg, rehearsal, info), stages=["features", "train", "ensemble"])
    return rehearsal


@pytest.mark.slow
def test_a_head_per_backbone_xgboost_over_all_and_a_blend_of_every_model(trained: Path) -> None:
    cfg = load_config(trained / "config.yaml")
    models = ["xgb", "head", f"head_{OTHER}"]
    assert model_names(cfg) == models
    catalog = read_parquet(trained / "catalog.parquet")
    for model in models:
        oof = read_predictions(prediction_path(trained, "oof", model))
        test = read_predictions(prediction_path(trained, "test", model))
        assert sorted(oof.index) == sorted(catalog.loc[catalog[SPLIT] == SPLIT_TRAIN, VIDEO_ID])
        assert sorted(test.index) == sorted(catalog.loc[catalog[SPLIT] == SPLIT_TEST, VIDEO_ID])
    # each head read its own backbone's frames (64-d, 1280-d) and the same metadata columns, no pooled ones
    for model, dim in (("head", 64), (f"head_{OTHER}", 1280)):
        spec = json.loads((trained / "models" / model / "fold0.json").read_text())
        assert spec["init_kwargs"]["embed_dim"] == dim and spec["init_kwargs"]["meta_dim"] == len(META_FEATURES)
    xgb = json.loads((trained / "models" / "xgb" / "features.json").read_text())["features"]
    assert {"emb_mean_0000", f"emb_{OTHER}_max_1279", "emb_pca_000", f"emb_{OTHER}_pca_002"} <= set(xgb)
    training = json.loads((trained / "train_metrics.json").read_text())
    assert sorted(training) == sorted(models) and all(np.isfinite(training[m]["oof_log_loss"]) for m in models)
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["models"] == models and set(metrics["oof"]) == {*models, "blend"}
    assert json.loads((trained / "models" / "ensemble.json").read_text())["models"] == models
    assert metrics["oof"]["blend"]["mean_log_loss"] < metrics["prior_baseline_oof"]["mean_log_loss"]
    report = (trained / "report.html").read_text()
    for model in models:
        score = f"{metrics['oof'][model]['mean_log_loss']:.5f}"
        assert f"<td>{model}</td>" in report and score in report
    assert len(pd.read_csv(trained / "submission.csv")) == (catalog[SPLIT] == SPLIT_TEST).sum()


@pytest.mark.slow
def test_predict_scores_new_clips_with_every_backbone_and_model(trained: Path, dask_client: Client,
                                                                tmp_path: Path) -> None:
    """The run's own test clips, scored as new clips, get the ensemble's test predictions back."""
    cfg: JobConfig = load_config(trained / "config.yaml")
    embed, features = trained_settings(trained, cfg)
    assert embed.backbone_names == [MAIN, OTHER]
    catalog = read_parquet(trained / "catalog.parquet", columns=[VIDEO_ID, SPLIT])
    index = pd.Index(catalog.loc[catalog[SPLIT] == SPLIT_TEST, VIDEO_ID])
    proba = score_embedded(dask_client, trained, embed_dirs(cfg, trained), tmp_path, features, index)
    expected = read_predictions(prediction_path(trained, "test", "blend")).loc[index, list(CLASS_NAMES)]
    np.testing.assert_allclose(proba.loc[index].to_numpy(), expected.to_numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="head_efficientnet_lite0"):  # a backbone missing: named, not guessed
        score_embedded(dask_client, trained, {MAIN: embed_dirs(cfg, trained)[MAIN]}, tmp_path / "x", features,
                       index)
