"""The neural head: masking, empty clips, beating the prior, determinism, weight round trip, padding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from jungletrap.config import HeadConfig
from jungletrap.head import POOLINGS, FrameHead, HeadData, build_head, fit_head, pad_frames, predict_head
from jungletrap.metrics import mean_log_loss

T, D, M, C = 8, 32, 3, 6


def _synthetic(n: int, *, seed: int) -> HeadData:
    """Clips where a present class shifts some real frames along its direction; a few clips have no frames."""
    rng = np.random.default_rng(seed)
    directions = np.random.default_rng(1234).normal(size=(C, D)).astype(np.float32)
    prior = np.linspace(0.08, 0.4, C)
    labels = (rng.random((n, C)) < prior).astype(np.float32)
    lengths = rng.integers(1, T + 1, size=n)
    lengths[rng.random(n) < 0.05] = 0
    embeddings = []
    for i in range(n):
        emb = rng.normal(size=(lengths[i], D)).astype(np.float32)
        for c in np.flatnonzero(labels[i]):
            hit = rng.random(lengths[i]) < 0.5
            emb[hit] += 1.5 * directions[c]
        embeddings.append(emb.astype(np.float16))
    frames, mask = pad_frames(embeddings, max_frames=T, dim=D)
    meta = rng.normal(size=(n, M)).astype(np.float32)
    meta[rng.random((n, M)) < 0.1] = np.nan
    return HeadData(frames=frames, mask=mask, meta=meta, labels=labels)


@pytest.fixture(scope="module")
def split() -> tuple[HeadData, HeadData]:
    return _synthetic(200, seed=0), _synthetic(100, seed=1)


def _cfg(pooling: str = "attention_maxmin", **kw: Any) -> HeadConfig:
    base: dict[str, Any] = {"pooling": pooling, "hidden": 32, "dropout": 0.1, "max_frames": T,
                               "epochs": 25, "patience": 5, "batch_size": 32, "lr": 3e-3}
    return HeadConfig(**{**base, **kw})


def _forward(model: FrameHead, data: HeadData) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.from_numpy(data.frames), torch.from_numpy(data.mask), torch.from_numpy(data.meta))


def _random_model(pooling: str) -> FrameHead:
    torch.manual_seed(0)
    model = FrameHead(embed_dim=D, meta_dim=M, n_classes=C, hidden=16, pooling=pooling).eval()
    torch.nn.init.normal_(model.classifier.weight)  # the zero init would hide any dependence on the frames
    return model


@pytest.mark.parametrize("pooling", POOLINGS)
def test_padded_values_and_width_do_not_change_outputs(pooling: str, split: tuple[HeadData, ...]) -> None:
    data = split[1]
    model = _random_model(pooling)
    base = _forward(model, data)
    noisy = data.frames.copy()
    noisy[~data.mask] = np.random.default_rng(5).uniform(-1e6, 1e6, size=(int((~data.mask).sum()), D))
    assert torch.equal(_forward(model, HeadData(noisy, data.mask, data.meta)), base)
    wider = HeadData(np.concatenate([noisy, np.full_like(noisy, 7.0)], axis=1),
                     np.concatenate([data.mask, np.zeros_like(data.mask)], axis=1), data.meta)
    torch.testing.assert_close(_forward(model, wider), base, rtol=1e-5, atol=1e-5)
    changed = data.frames.copy()
    changed[data.mask] += 3.0  # real frames must matter (so the checks above can fail)
    assert not torch.allclose(_forward(model, HeadData(changed, data.mask, data.meta)), base)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_zero_frame_rows_are_finite_and_use_meta(pooling: str) -> None:
    model = _random_model(pooling)
    frames = np.random.default_rng(0).normal(size=(4, T, D)).astype(np.float32)
    mask = np.zeros((4, T), dtype=bool)
    mask[0, :3] = True
    meta = np.array([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [-2.0, 1.0, np.nan], [np.nan] * 3], dtype=np.float32)
    out = _forward(model, HeadData(frames, mask, meta))
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[1], out[2])  # empty clips still see their metadata
    frames[1:] = 0
    assert torch.equal(_forward(model, HeadData(frames, mask, meta)), out)
    loss = model.train()(torch.from_numpy(frames), torch.from_numpy(mask), torch.from_numpy(meta)).sum()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_fit_beats_the_class_prior(pooling: str, split: tuple[HeadData, HeadData]) -> None:
    train, valid = split
    assert train.labels is not None and valid.labels is not None
    prior = train.labels.mean(axis=0)
    baseline = mean_log_loss(valid.labels, np.broadcast_to(prior, valid.labels.shape))
    fit = fit_head(train, valid, cfg=_cfg(pooling), seed=0, class_prior=prior)
    assert fit.best_valid_loss < 0.8 * baseline, (fit.best_valid_loss, baseline)
    assert fit.best_valid_loss == min(row["valid_loss"] for row in fit.curve)
    assert fit.curve[fit.best_epoch - 1]["epoch"] == fit.best_epoch
    proba = predict_head(build_head(fit.init_kwargs, fit.state_dict), valid)
    assert proba.dtype == np.float64 and proba.shape == valid.labels.shape
    assert mean_log_loss(valid.labels, proba) == pytest.approx(fit.best_valid_loss, rel=1e-9)


def test_untrained_head_predicts_the_prior(split: tuple[HeadData, HeadData]) -> None:
    train, valid = split
    assert train.labels is not None
    prior = train.labels.mean(axis=0)
    fit = fit_head(train, valid, cfg=_cfg(epochs=1, lr=1e-12), seed=0, class_prior=prior)
    proba = predict_head(build_head(fit.init_kwargs, fit.state_dict), valid)
    np.testing.assert_allclose(proba, np.broadcast_to(prior, proba.shape), rtol=1e-5)


def test_early_stopping_respects_patience(split: tuple[HeadData, HeadData]) -> None:
    fit = fit_head(*split, cfg=_cfg(epochs=40, patience=2, lr=5e-2), seed=0)
    assert len(fit.curve) <= fit.best_epoch + 2
    assert [row["epoch"] for row in fit.curve] == list(range(1, len(fit.curve) + 1))


def test_fixed_epoch_fit_runs_exactly_that_many_epochs_and_keeps_the_last(split: tuple[HeadData, HeadData]) -> None:
    """The refit's mode: no rows to stop on, ``epochs`` epochs (not ``cfg.epochs``), the last epoch's weights."""
    train, valid = split
    cfg = _cfg(epochs=40, patience=1, lr=5e-2)
    fit = fit_head(train, None, cfg=cfg, seed=0, epochs=3)
    assert [row["epoch"] for row in fit.curve] == [1, 2, 3] and fit.best_epoch == 3
    two = fit_head(train, None, cfg=cfg, seed=0, epochs=2)  # the same trajectory, one epoch shorter
    assert two.curve == fit.curve[:2]
    assert not np.array_equal(predict_head(build_head(fit.init_kwargs, fit.state_dict), valid),
                              predict_head(build_head(two.init_kwargs, two.state_dict), valid))
    with pytest.raises(ValueError, match="either valid rows"):
        fit_head(train, valid, cfg=cfg, seed=0, epochs=3)
    with pytest.raises(ValueError, match="either valid rows"):
        fit_head(train, None, cfg=cfg, seed=0)


def test_fit_is_deterministic_and_leaves_global_state(split: tuple[HeadData, HeadData]) -> None:
    train, valid = split
    cfg = _cfg("gru", epochs=3)
    rng_before, threads_before = torch.get_rng_state(), torch.get_num_threads()
    first = _fit_predict(train, valid, cfg, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before) and torch.get_num_threads() == threads_before
    again = _fit_predict(train, valid, cfg, seed=3)
    other = _fit_predict(train, valid, cfg, seed=4)
    assert np.array_equal(first, again)
    assert not np.allclose(first, other)


def _fit_predict(train: HeadData, valid: HeadData, cfg: HeadConfig, *, seed: int) -> np.ndarray:
    fit = fit_head(train, valid, cfg=cfg, seed=seed)
    return predict_head(build_head(fit.init_kwargs, fit.state_dict), valid)


def test_state_dict_round_trip(tmp_path: Path, split: tuple[HeadData, HeadData]) -> None:
    train, valid = split
    assert train.labels is not None
    fit = fit_head(train, valid, cfg=_cfg(epochs=2), seed=0, class_prior=train.labels.mean(axis=0))
    torch.save(fit.state_dict, tmp_path / "head.pt")
    (tmp_path / "head.json").write_text(json.dumps(fit.init_kwargs), encoding="utf-8")
    state = torch.load(tmp_path / "head.pt", map_location="cpu", weights_only=True)
    model = build_head(json.loads((tmp_path / "head.json").read_text(encoding="utf-8")), state)
    original = predict_head(build_head(fit.init_kwargs, fit.state_dict), valid)
    assert np.array_equal(predict_head(model, valid), original)
    np.testing.assert_allclose(predict_head(model, valid, batch_size=7), original, rtol=1e-6)


def test_pad_frames_subsamples_evenly_and_zero_pads() -> None:
    long = np.arange(20 * 2, dtype=np.float16).reshape(20, 2)
    short = np.ones((2, 2), dtype=np.float32)
    frames, mask = pad_frames([long, short, np.zeros((0, 2))], max_frames=4, dim=2)
    assert frames.dtype == np.float32 and frames.shape == (3, 4, 2) and mask.dtype == bool
    assert frames[0, :, 0].tolist() == [4.0, 14.0, 24.0, 34.0]  # frames 2, 7, 12, 17: segment centres
    assert mask.tolist() == [[True] * 4, [True, True, False, False], [False] * 4]
    assert frames[1, 2:].tolist() == [[0.0, 0.0]] * 2 and not frames[2].any()
    with pytest.raises(ValueError, match="not"):
        pad_frames([np.ones((3, 5))], max_frames=4, dim=2)
