"""The temporal importance predictor: a small MLP trained online with AdamW.

For each access it predicts the time to the block's next access (log scale, in accesses,
censored at the horizon and normalised to [0, 1]), as in Learning Relaxed Belady. Labels come
from the future only as it arrives: when a block recurs, its pending sample gets the real gap;
when the horizon passes without a reuse, it gets the censored label 1.0. There is no look-ahead
and no pre-training. It runs on CUDA when the configured device has it, else on CPU.

Training is cheap by construction: one AdamW step on a minibatch drawn from a replay buffer of
recent labelled samples every ``train_every`` new labels.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kvtier.policy.learned.features import N_FEATURES


@dataclass(frozen=True, slots=True)
class PredictorStats:
    """Counters for status and /metrics."""

    labelled: int
    steps: int
    loss: float  # exponential moving average of the training loss; nan before any step
    accuracy: float  # online: predicted vs actual "reused within horizon/8"; nan before labels
    train_seconds: float
    infer_seconds: float
    ready: bool


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; anything else is passed to torch as is."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Predictor:
    """Model, optimiser, pending labels and replay buffer. Not thread-safe (callers lock)."""

    def __init__(self, horizon: int, *, seed: int = 0, device: str = "cpu", hidden: int = 32,
                 lr: float = 3e-3, batch: int = 256, train_every: int = 128,
                 buffer: int = 16384, min_labels: int = 2048) -> None:
        self.horizon = max(16, horizon)
        self.device = resolve_device(device)
        gen = torch.Generator().manual_seed(seed)
        self.model = nn.Sequential(
            nn.Linear(N_FEATURES, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 1),
        )
        with torch.no_grad():
            for p in self.model.parameters():
                bound = 1.0 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.05
                p.uniform_(-bound, bound, generator=gen)
            last = self.model[-1]
            assert isinstance(last, nn.Linear)
            last.bias.fill_(1.0)  # start by predicting "not reused within the horizon"
        self.model.to(self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=1e-4)
        self.rng = np.random.default_rng(seed)
        self.batch = batch
        self.train_every = train_every
        self.min_labels = min_labels
        self._x = np.zeros((buffer, N_FEATURES), dtype=np.float32)
        self._y = np.zeros(buffer, dtype=np.float32)
        self._filled = 0
        self._cursor = 0
        self._since_train = 0
        self._log_h = math.log1p(self.horizon)
        self._thr = math.log1p(self.horizon / 8) / self._log_h
        # key -> (seq of the access, its features, the prediction made then)
        self._pending: dict[Hashable, tuple[int, list[float], float]] = {}
        self._expiry: deque[tuple[int, Hashable]] = deque()
        self.labelled = 0
        self.steps = 0
        self.loss = float("nan")
        self._correct = 0
        self.train_seconds = 0.0
        self.infer_seconds = 0.0

    @property
    def ready(self) -> bool:
        return self.labelled >= self.min_labels

    def stats(self) -> PredictorStats:
        acc = self._correct / self.labelled if self.labelled else float("nan")
        return PredictorStats(self.labelled, self.steps, self.loss, acc, self.train_seconds,
                              self.infer_seconds, self.ready)

    def to_gap(self, pred: float) -> float:
        """A normalised prediction back to accesses."""
        return math.expm1(min(max(pred, 0.0), 1.5) * self._log_h)

    def predict(self, rows: Sequence[Sequence[float]]) -> list[float]:
        if not rows:
            return []
        t0 = time.perf_counter()
        with torch.no_grad():
            x = torch.as_tensor(np.asarray(rows, dtype=np.float32), device=self.device)
            out: list[float] = self.model(x).squeeze(1).tolist()
        self.infer_seconds += time.perf_counter() - t0
        return out

    def observe(self, keys: Sequence[Hashable], seq0: int, rows: Sequence[list[float]],
                preds: Sequence[float]) -> None:
        """Accesses ``seq0 + i`` to ``keys[i]``: label their previous samples, queue new ones."""
        end = seq0 + len(keys)
        self._expire(end)
        pending = self._pending
        for i, key in enumerate(keys):
            s = seq0 + i
            old = pending.get(key)
            if old is not None:
                gap = s - old[0]
                self._label(old[1], old[2], math.log1p(gap) / self._log_h
                            if gap < self.horizon else 1.0)
            pending[key] = (s, rows[i], preds[i])
            self._expiry.append((s, key))
        if self._since_train >= self.train_every:
            self._since_train = 0
            self._train()

    def _expire(self, now: int) -> None:
        q = self._expiry
        pending = self._pending
        while q and q[0][0] <= now - self.horizon:
            s, key = q.popleft()
            old = pending.get(key)
            if old is not None and old[0] == s:
                del pending[key]
                self._label(old[1], old[2], 1.0)

    def _label(self, row: list[float], pred: float, y: float) -> None:
        self._x[self._cursor] = row
        self._y[self._cursor] = y
        self._cursor = (self._cursor + 1) % len(self._y)
        self._filled = min(self._filled + 1, len(self._y))
        self.labelled += 1
        self._since_train += 1
        if (pred < self._thr) == (y < self._thr):
            self._correct += 1

    def _train(self) -> None:
        t0 = time.perf_counter()
        idx = self.rng.integers(0, self._filled, size=min(self.batch, self._filled))
        x = torch.as_tensor(self._x[idx], device=self.device)
        y = torch.as_tensor(self._y[idx], device=self.device)
        loss = nn.functional.mse_loss(self.model(x).squeeze(1), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        self.opt.step()
        v = float(loss.item())
        self.loss = v if math.isnan(self.loss) else 0.98 * self.loss + 0.02 * v
        self.steps += 1
        self.train_seconds += time.perf_counter() - t0
