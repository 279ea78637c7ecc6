"""Rows for the chat stages (SFT, RL): a seeded order over examples, epoch after epoch, and
right-padded (inputs, targets) batches of token rows with per-position target flags."""

from __future__ import annotations

import numpy as np
import torch


class EpochOrder:
    """Indices 0..n-1 in a seeded order that changes every epoch; take(k) continues where the last
    call stopped. Its state is (epoch, cursor): exact resume."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def take(self, k: int) -> list[int]:
        picks = []
        while len(picks) < k:
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            picks.append(int(self._order[self.cursor]))
            self.cursor += 1
        return picks

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation(self.epoch)


def pad_rows(rows: list[tuple[list[int], list]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, target flags) rows -> x (B, T) inputs and y (B, T) targets, right-padded to the
    longest row: y[t] = ids[t + 1] where flags[t + 1] is set, else -1 (and -1 on the padding)."""
    width = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, (ids, flags) in enumerate(rows):
        ids_t = torch.tensor(ids)
        x[r, :len(ids) - 1] = ids_t[:-1]
        y[r, :len(ids) - 1] = torch.where(torch.tensor(flags[1:], dtype=torch.bool), ids_t[1:], -1)
    return x, y
