"""The seed's neural head: frame embeddings (T×D per clip) + clip metadata → 24 class logits.

Frames are projected (LayerNorm, then D→hidden), pooled over time by attention + max + min (or by a
bidirectional GRU), fused with a small metadata MLP and mapped to one logit per class. Padded frames never
reach the output: their values are zeroed on entry and every pooling step is masked, so a clip's prediction
depends on its real frames only (and not on how wide it was padded). A clip with no frames (an error row)
pools to zeros and is predicted from its metadata plus an explicit "no frames" flag.

The loss is the competition metric itself (binary log loss averaged over the classes), with no class
reweighting: log loss rewards calibration, not recall, so the output bias starts at ``logit(class_prior)`` and
the last layer at zero, making the untrained model predict the prior exactly. Pure PyTorch; no Dask, no I/O.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from jungletrap.config import HeadConfig
from jungletrap.metrics import mean_log_loss

__all__ = [
    "POOLINGS", "Batch", "FrameHead", "HeadData", "HeadFit", "HeadSource", "build_head", "fit_head", "pad_frames",
    "predict_head", "select_frames",
]

POOLINGS: tuple[str, ...] = ("attention_maxmin", "gru")
_PRIOR_EPS = 1e-4  # a class absent from the training rows starts at p=1e-4, not logit(0) = -inf
_GRAD_CLIP = 5.0


#: One training or prediction batch: frames (B, T, D), real-frame mask (B, T), meta (B, M), labels (B, C) or None.
Batch = tuple[Tensor, Tensor, Tensor, Tensor | None]


class HeadSource(Protocol):
    """Rows the head trains on or predicts, served in batches: in memory (:class:`HeadData`) or streamed from
    Parquet (:class:`jungletrap.head_stream.ClipStream`). Unshuffled batches come in a fixed row order, the order of
    ``labels``; a ``shuffle_seed`` gives a reproducible random order for one epoch."""

    @property
    def embed_dim(self) -> int: ...

    @property
    def meta_dim(self) -> int: ...

    @property
    def labels(self) -> np.ndarray | None: ...

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, *, shuffle_seed: int | None = None) -> Iterator[Batch]: ...


@dataclass
class HeadData:
    """Aligned model inputs for N clips, in memory (tests, small data); a :class:`HeadSource`.

    ``meta`` may hold NaN: the model replaces it by 0 and appends a missing-indicator per column, so
    "unknown" stays distinguishable from "average". ``frames`` may also be float16 (converted per batch).
    """

    frames: np.ndarray  # (N, T, D) float32, zero-padded
    mask: np.ndarray  # (N, T) bool, True = real frame
    meta: np.ndarray  # (N, M) float32, standardised
    labels: np.ndarray | None = None  # (N, C) float32 0/1

    def __post_init__(self) -> None:
        n = len(self.frames)
        if self.frames.ndim != 3 or self.mask.shape != self.frames.shape[:2]:
            raise ValueError(f"frames {self.frames.shape} must be (N, T, D), mask {self.mask.shape} (N, T)")
        if self.meta.ndim != 2 or len(self.meta) != n:
            raise ValueError(f"meta {self.meta.shape} must be (N={n}, M)")
        if self.labels is not None and (self.labels.ndim != 2 or len(self.labels) != n):
            raise ValueError(f"labels {self.labels.shape} must be (N={n}, C)")

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def embed_dim(self) -> int:
        return int(self.frames.shape[2])

    @property
    def meta_dim(self) -> int:
        return int(self.meta.shape[1])

    def batches(self, batch_size: int, *, shuffle_seed: int | None = None) -> Iterator[Batch]:
        frames, mask, meta = _tensors(self)
        labels = None if self.labels is None else torch.from_numpy(np.ascontiguousarray(self.labels, np.float32))
        order = (torch.arange(len(self)) if shuffle_seed is None
                 else torch.randperm(len(self), generator=torch.Generator().manual_seed(shuffle_seed)))
        for start in range(0, len(self), batch_size):
            idx = order[start : start + batch_size]
            yield frames[idx], mask[idx], meta[idx], None if labels is None else labels[idx]


@dataclass
class HeadFit:
    """A trained head: best-epoch weights (plain CPU tensors), JSON-safe constructor kwargs, the curve."""

    state_dict: dict[str, Tensor]
    init_kwargs: dict[str, Any]
    best_epoch: int
    best_valid_loss: float
    curve: list[dict[str, float]] = field(default_factory=list)


def select_frames(frames: np.ndarray, max_frames: int) -> np.ndarray:
    """At most ``max_frames`` of a clip's (n, D) frames, spread evenly in time (the centres of equal segments)."""
    n = len(frames)
    if n <= max_frames:
        return frames
    return frames[((np.arange(max_frames) + 0.5) * n / max_frames).astype(np.int64)]


def pad_frames(
    embeddings: Sequence[np.ndarray], *, max_frames: int, dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stack per-clip (n_i, D) arrays into (N, max_frames, D) float32 plus a (N, max_frames) real-frame mask.

    Longer clips keep ``max_frames`` frames spread evenly in time (the centre of equal segments), so the end
    of a clip is not cut off; shorter ones are zero-padded at the end. An empty array means no frames.
    """
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    frames = np.zeros((len(embeddings), max_frames, dim), dtype=np.float32)
    mask = np.zeros((len(embeddings), max_frames), dtype=bool)
    for i, emb in enumerate(embeddings):
        arr = np.asarray(emb)
        if arr.size == 0:
            continue
        if arr.ndim != 2 or arr.shape[1] != dim:
            raise ValueError(f"clip {i}: embedding shape {arr.shape} is not (n_frames, {dim})")
        arr = select_frames(arr, max_frames)
        frames[i, : len(arr)] = arr
        mask[i, : len(arr)] = True
    return frames, mask


class FrameHead(nn.Module):
    """Frame pooling + metadata MLP → ``n_classes`` logits; see the module docstring for the masking rules."""

    def __init__(self, *, embed_dim: int, meta_dim: int, n_classes: int = 24, hidden: int = 128,
                 dropout: float = 0.3, pooling: str = "attention_maxmin") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if embed_dim < 1 or meta_dim < 0 or n_classes < 1 or hidden < 1:
            raise ValueError("embed_dim, n_classes and hidden must be >= 1 and meta_dim >= 0")
        self.init_kwargs: dict[str, Any] = {
            "embed_dim": embed_dim, "meta_dim": meta_dim, "n_classes": n_classes,
            "hidden": hidden, "dropout": dropout, "pooling": pooling,
        }
        self.pooling = pooling
        self.project = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, hidden), nn.ReLU(),
                                     nn.Dropout(dropout))
        if pooling == "gru":
            self.gru = nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)
            pooled_dim = 2 * hidden
        else:
            self.attention = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))
            pooled_dim = 3 * hidden
        self.meta_mlp = (nn.Sequential(nn.Linear(2 * meta_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
                         if meta_dim else None)
        fused_dim = pooled_dim + (hidden if meta_dim else 0) + 1  # +1: the "no frames" flag
        self.fuse = nn.Sequential(nn.Linear(fused_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(hidden, n_classes)
        nn.init.zeros_(self.classifier.weight)  # untrained output = sigmoid(bias) = the class prior

    def forward(self, frames: Tensor, mask: Tensor, meta: Tensor) -> Tensor:
        """frames (B, T, D), mask (B, T) bool, meta (B, M) → logits (B, C)."""
        mask = mask.bool()
        has_frames = mask.any(dim=1)
        frames = frames.float().masked_fill(~mask.unsqueeze(-1), 0.0)  # padded values never enter the graph
        h = self.project(frames)
        pooled = self._pool_gru(h, mask) if self.pooling == "gru" else self._pool_attention_maxmin(h, mask)
        pooled = torch.where(has_frames.unsqueeze(-1), pooled, torch.zeros_like(pooled))
        parts = [pooled]
        if self.meta_mlp is not None:
            meta = meta.float()
            missing = torch.isnan(meta)
            parts.append(self.meta_mlp(torch.cat([meta.masked_fill(missing, 0.0), missing.float()], dim=1)))
        parts.append((~has_frames).float().unsqueeze(-1))
        return self.classifier(self.fuse(torch.cat(parts, dim=1)))

    def _pool_attention_maxmin(self, h: Tensor, mask: Tensor) -> Tensor:
        """Concat of attention-weighted mean, max and min over real frames; (B, 3H)."""
        real = mask.unsqueeze(-1)
        scores = self.attention(h).squeeze(-1).masked_fill(~mask, float("-inf"))
        scores = scores.masked_fill(~mask.any(dim=1, keepdim=True), 0.0)  # all-padded rows: no NaN softmax
        weights = torch.softmax(scores, dim=1) * mask
        attended = (weights.unsqueeze(-1) * h).sum(dim=1)
        high = h.masked_fill(~real, float("-inf")).amax(dim=1)
        low = h.masked_fill(~real, float("inf")).amin(dim=1)
        return torch.cat([attended, high, low], dim=1)  # ±inf rows (no frames) are zeroed by the caller

    def _pool_gru(self, h: Tensor, mask: Tensor) -> Tensor:
        """Final states of a bidirectional GRU run over the real frames only (packed); (B, 2H)."""
        lengths = mask.sum(dim=1).clamp(min=1).cpu()  # pack needs >=1; empty rows are zeroed by the caller
        packed = pack_padded_sequence(h, lengths, batch_first=True, enforce_sorted=False)
        _, last = self.gru(packed)
        return last.transpose(0, 1).reshape(h.shape[0], -1)


def build_head(init_kwargs: dict[str, Any], state_dict: dict[str, Tensor] | None = None) -> FrameHead:
    """Rebuild a head from its JSON kwargs and (optionally) its weights; returned in eval mode.

    Construction runs on a forked RNG so that loading a model does not shift the caller's random stream.
    """
    with torch.random.fork_rng(devices=[]):
        model = FrameHead(**init_kwargs)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model.eval()


def _tensors(data: HeadData) -> tuple[Tensor, Tensor, Tensor]:
    frames = torch.from_numpy(np.ascontiguousarray(data.frames))
    mask = torch.from_numpy(np.asarray(data.mask, dtype=bool))
    return frames, mask, torch.from_numpy(np.ascontiguousarray(data.meta, dtype=np.float32))


def predict_head(model: FrameHead, data: HeadSource, *, batch_size: int = 256) -> np.ndarray:
    """Class probabilities (N, C) float64 in ``data``'s unshuffled row order, in eval mode (no dropout)."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    with torch.inference_mode():
        for frames, mask, meta, _ in data.batches(batch_size):
            logits = model(frames.to(device), mask.to(device), meta.to(device))
            out.append(torch.sigmoid(logits.double()).cpu().numpy())
    n_classes = int(model.init_kwargs["n_classes"])
    return np.concatenate(out) if out else np.zeros((0, n_classes), dtype=np.float64)


def _drop_frames(mask: Tensor, rate: float, gen: torch.Generator) -> Tensor:
    """Training augmentation: hide each real frame with probability ``rate``; every clip keeps one."""
    if rate <= 0:
        return mask
    kept = mask & (torch.rand(mask.shape, generator=gen) >= rate)
    emptied = ~kept.any(dim=1) & mask.any(dim=1)
    return torch.where(emptied.unsqueeze(1), mask, kept)


def _optimizer(model: nn.Module, cfg: HeadConfig) -> torch.optim.Optimizer:
    """AdamW, decaying weight matrices only: decaying the output bias would pull it off the prior."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _check_fit_inputs(train: HeadSource, valid: HeadSource | None, class_prior: np.ndarray | None) -> None:
    if train.labels is None or len(train) == 0:
        raise ValueError(f"fit_head needs labelled rows in train ({len(train)} rows)")
    if valid is not None:
        if valid.labels is None or len(valid) == 0:
            raise ValueError(f"fit_head needs labelled rows in valid ({len(valid)} rows)")
        if train.embed_dim != valid.embed_dim or train.meta_dim != valid.meta_dim:
            raise ValueError("train and valid disagree on the embedding or metadata width")
        if train.labels.shape[1] != valid.labels.shape[1]:
            raise ValueError("train and valid disagree on the number of classes")
    if class_prior is not None and np.shape(class_prior) != (train.labels.shape[1],):
        raise ValueError(f"class_prior shape {np.shape(class_prior)} != ({train.labels.shape[1]},)")


def _epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of one epoch: a fixed function of the fit's seed, so a rerun sees the same orders."""
    return (seed * 1_000_003 + epoch) % 2**63


def fit_head(train: HeadSource, valid: HeadSource | None, *, cfg: HeadConfig, seed: int,
             class_prior: np.ndarray | None = None, frame_dropout: float = 0.1,
             device: str | torch.device = "cpu", epochs: int | None = None) -> HeadFit:
    """Train a :class:`FrameHead` with early stopping on the ``valid`` log loss; keep the best epoch's weights.

    ``valid`` is the rows early stopping watches (the fold's inner stopping split, never the rows the model is then
    scored on). Either source may be in memory or streamed; each epoch reads ``train`` once in a shuffled order
    and ``valid`` once in order. Deterministic on CPU for a fixed seed: initialisation and dropout use a forked,
    seeded global RNG (the caller's RNG state is restored), the epoch orders a seed per epoch and frame dropout a
    private ``torch.Generator``; the thread count is pinned to ``cfg.torch_threads`` (restored afterwards).
    ``frame_dropout`` hides real frames at random while training only. ``valid_loss`` is the competition metric.

    ``valid`` None with ``epochs`` (the refit on all of a fold's training rows): train exactly that many epochs,
    nothing to stop on, and keep the last epoch's weights.
    """
    if (valid is None) != (epochs is not None):
        raise ValueError("fit_head takes either valid rows to stop on or a fixed number of epochs, not both")
    _check_fit_inputs(train, valid, class_prior)
    threads = torch.get_num_threads()
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    torch.set_num_threads(cfg.torch_threads)
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return _fit(train, valid, cfg=cfg, seed=seed, class_prior=class_prior, frame_dropout=frame_dropout,
                        device=torch.device(device), epochs=epochs)
    finally:
        torch.set_num_threads(threads)


def _new_model(train: HeadSource, cfg: HeadConfig, class_prior: np.ndarray | None) -> FrameHead:
    assert train.labels is not None
    model = FrameHead(embed_dim=train.embed_dim, meta_dim=train.meta_dim, n_classes=train.labels.shape[1],
                      hidden=cfg.hidden, dropout=cfg.dropout, pooling=cfg.pooling)
    if class_prior is not None:
        prior = torch.as_tensor(np.clip(class_prior, _PRIOR_EPS, 1 - _PRIOR_EPS), dtype=torch.float32)
        with torch.no_grad():
            model.classifier.bias.copy_(torch.logit(prior))
    return model


def _train_epoch(model: FrameHead, optimizer: torch.optim.Optimizer, train: HeadSource, *, cfg: HeadConfig,
                 shuffle_seed: int, frame_dropout: float, gen: torch.Generator, device: torch.device) -> float:
    """One pass over ``train`` in the epoch's order; returns the mean training loss."""
    model.train()
    total, seen = 0.0, 0
    for frames, mask, meta, labels in train.batches(cfg.batch_size, shuffle_seed=shuffle_seed):
        assert labels is not None
        batch_mask = _drop_frames(mask, frame_dropout, gen)
        logits = model(frames.to(device), batch_mask.to(device), meta.to(device))
        loss = F.binary_cross_entropy_with_logits(logits, labels.to(device))  # = the metric
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), _GRAD_CLIP)
        optimizer.step()
        total += float(loss.detach()) * len(labels)
        seen += len(labels)
    return total / max(seen, 1)


def _fit(train: HeadSource, valid: HeadSource | None, *, cfg: HeadConfig, seed: int,
         class_prior: np.ndarray | None, frame_dropout: float, device: torch.device,
         epochs: int | None) -> HeadFit:
    """The epoch loop: stop on ``valid`` (best epoch kept), or run ``epochs`` epochs (last kept)."""
    model = _new_model(train, cfg, class_prior).to(device)
    optimizer = _optimizer(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    best_loss, best_epoch, best_state = float("inf"), 0, copy.deepcopy(model.state_dict())
    curve: list[dict[str, float]] = []
    for epoch in range(1, (epochs or cfg.epochs) + 1):
        train_loss = _train_epoch(model, optimizer, train, cfg=cfg, shuffle_seed=_epoch_seed(seed, epoch),
                                  frame_dropout=frame_dropout, gen=gen, device=device)
        if valid is None:
            curve.append({"epoch": epoch, "train_loss": train_loss})
            continue
        assert valid.labels is not None
        valid_loss = mean_log_loss(valid.labels, predict_head(model, valid))
        curve.append({"epoch": epoch, "train_loss": train_loss, "valid_loss": valid_loss})
        if valid_loss < best_loss:
            best_loss, best_epoch, best_state = valid_loss, epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= cfg.patience:
            break
    if valid is None:
        best_epoch, best_state = len(curve), model.state_dict()
    state = {k: v.detach().cpu().clone().contiguous() for k, v in best_state.items()}
    return HeadFit(state_dict=state, init_kwargs=dict(model.init_kwargs), best_epoch=best_epoch,
                   best_valid_loss=best_loss, curve=curve)
