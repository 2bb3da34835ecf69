"""Deterministic, resumable batches of token windows.

The token stream of a split is cut into non-overlapping windows of
``seq_len + 1`` tokens (window ``i`` starts at ``i * seq_len``; the extra
token gives the last target). Training visits the windows epoch by epoch in a
permutation drawn from ``(seed, epoch)``; the whole iterator state is one
integer, the number of windows consumed, which goes into the checkpoint.
Evaluation uses the first windows of the validation stream, in order.
"""

from __future__ import annotations

import numpy as np

__all__ = ["num_windows", "TrainBatches", "eval_batches", "make_batch"]


def num_windows(tokens: np.ndarray, seq_len: int) -> int:
    return max(0, (len(tokens) - 1) // seq_len)


def _window(tokens: np.ndarray, i: int, seq_len: int) -> np.ndarray:
    return np.asarray(tokens[i * seq_len : i * seq_len + seq_len + 1], dtype=np.int32)


def make_batch(windows: np.ndarray) -> dict[str, np.ndarray]:
    """``{"inputs", "targets"}`` int32[B, T] from int32[B, T + 1] windows."""
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


class TrainBatches:
    """Batches of ``batch_size`` windows, resumable from `position`.

    Args:
      tokens: the train token stream (1-D, e.g. a `np.memmap`).
      seq_len: tokens per example.
      batch_size: windows per batch (the global batch, all accumulation steps).
      seed: permutation seed.
      position: windows consumed so far (0 for a fresh run).
    """

    def __init__(
        self, tokens: np.ndarray, seq_len: int, batch_size: int, *, seed: int, position: int = 0
    ):
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.n = num_windows(tokens, seq_len)
        if self.n < batch_size:
            raise ValueError(
                f"train split has {self.n} windows of {seq_len + 1} tokens, fewer than "
                f"batch_size={batch_size}"
            )
        self.position = int(position)
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def window_ids(self, position: int, count: int) -> np.ndarray:
        """Window indices ``position, ..., position + count - 1`` of the visiting order."""
        out = np.empty(count, np.int64)
        for j in range(count):
            epoch, k = divmod(position + j, self.n)
            out[j] = self._order(epoch)[k]
        return out

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        ids = self.window_ids(self.position, self.batch_size)
        self.position += self.batch_size
        return make_batch(np.stack([_window(self.tokens, int(i), self.seq_len) for i in ids]))

    @property
    def epoch(self) -> float:
        return self.position / self.n


def eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, num_batches: int
) -> list[dict[str, np.ndarray]]:
    """The first ``num_batches`` full batches of validation windows, in order.

    Fewer batches are returned when the split is smaller; an error if it holds
    less than one batch.
    """
    n = num_windows(tokens, seq_len)
    k = min(num_batches, n // batch_size)
    if k == 0:
        raise ValueError(
            f"validation split has {n} windows of {seq_len + 1} tokens, fewer than "
            f"batch_size={batch_size}"
        )
    return [
        make_batch(
            np.stack([_window(tokens, b * batch_size + j, seq_len) for j in range(batch_size)])
        )
        for b in range(k)
    ]
