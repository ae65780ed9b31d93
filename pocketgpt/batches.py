"""Batches: pretraining windows of train.bin, SFT rows grouped by length, DPO pairs; seeded and resumable.

Owns: the data order and position a checkpoint restores, each process's slice of a global batch, and the
fixed evaluation sample shared by 02, 03 and 04.
Imports: common, tokenizer.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .common import IGNORE_ID, PAD_ID, PocketGPTError
from .tokenizer import read_bin


class TokenWindows:
    """Non-overlapping (T+1)-token windows of a .bin file, in a seeded random order, epoch after epoch.

    The position (epoch, index) is all the state there is, so a checkpoint can resume the data
    exactly. With several processes each takes its own slice of every global batch.
    """

    def __init__(self, path, context: int, batch_size: int, seed: int, vocab_size: int):
        self.path, self.T, self.B, self.seed = Path(path), context, batch_size, seed
        self.rank, self.world = 0, 1  # one process's share of each global batch: train() sets them for its processes
        self.data = read_bin(path)
        self.n = (len(self.data) - 1) // context
        if self.n < 1:
            raise PocketGPTError(f"{path} holds {len(self.data)} tokens, fewer than one context window of "
                                 f"{context + 1}: use a smaller n_positions or a larger corpus/val_fraction.")
        check_token_ids(self.data, vocab_size, path)
        self.epoch, self.index, self._order = 0, 0, None

    def order(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(self.n))
        return self._order[1]

    def next_batch(self):
        picked = []
        while len(picked) < self.B * self.world:
            take = min(self.B * self.world - len(picked), self.n - self.index)
            picked.extend(self.order()[self.index:self.index + take])
            self.index += take
            if self.index == self.n:
                self.epoch, self.index = self.epoch + 1, 0
        return self.windows(picked[self.rank * self.B:(self.rank + 1) * self.B])

    def windows(self, idx):
        """Inputs and targets (the same tokens moved by one) of the windows numbered idx."""
        rows = np.stack([self.data[i * self.T:i * self.T + self.T + 1] for i in idx]).astype(np.int64)
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())

    def largest_batch(self):
        """A batch as large as any this data gives (every window is T long): train() tries it before the first
        step, so a micro-batch that does not fit is found at once. The position does not move."""
        return self.windows(np.arange(self.B) % self.n)

    def split(self, batch, rows: int) -> list:
        return split_rows(batch, rows)

    def epochs_done(self) -> float:
        """Passes over the training windows so far (1.5: one and a half)."""
        return self.epoch + self.index / self.n

    def steps_for(self, epochs: float, accum: int) -> int:
        """Optimizer steps that take `epochs` passes over the windows (global batches of B per process)."""
        return max(1, math.ceil(epochs * self.n / (self.B * self.world * accum)))

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def eval_batches(self, n_windows: int):
        """The fixed evaluation sample (eval_sample) as batches: the same windows in 02 and 04,
        at every evaluation, spread over the whole split rather than its first pages."""
        idx = eval_sample(self.n, n_windows)
        return [self.windows(idx[i:i + self.B]) for i in range(0, len(idx), self.B)]


EVAL_SEED = 0  # one evaluation sample for every run, stage and seed, so their numbers compare


def eval_sample(n: int, k: int) -> np.ndarray:
    """k of n items spread over all of them by a fixed seed, in order; all n when k >= n."""
    if k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(EVAL_SEED).choice(n, size=k, replace=False))


def check_token_ids(data: np.ndarray, vocab_size: int, path) -> None:
    """A token id outside the vocabulary would index past the embedding: catch it with a name."""
    chunk = 1 << 24
    for start in range(0, len(data), chunk):
        top = int(data[start:start + chunk].max())
        if top >= vocab_size:
            pos = start + int(np.argmax(data[start:start + chunk] >= vocab_size))
            raise PocketGPTError(f"{path} holds token id {data[pos]} at position {pos}, but the vocabulary has "
                                 f"{vocab_size} tokens: the .bin files and the tokenizer do not belong together. "
                                 f"Run 01_tokenizer again.")


class DialogBatches:
    """Global batches of rows of similar length, so little of a batch is padding; seeded and resumable.

    Each epoch: a seeded shuffle, rows sorted by length inside chunks of 64 batches, the batches
    shuffled again. A global batch holds batch_size rows per process, and process r takes every
    world-th row of it, so all processes get rows of about the same length. The batches depend on
    the process count, which is part of the cache key: epoch 0 once used the batches built for
    one process (half-size batches on two). Inputs are padded with <pad>, targets with -100.
    """

    variable_shapes = True  # a batch is as wide (and the last as long) as it happens to be: train() compiles dynamic

    def __init__(self, rows, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.rows, self.B, self.seed, self.rank, self.world = rows, batch_size, seed, rank, world
        self.epoch, self.index, self._batches = 0, 0, None

    def batches(self) -> list:
        if self._batches is None or self._batches[0] != (self.epoch, self.world):
            rng = np.random.default_rng([self.seed, self.epoch])
            order, size = rng.permutation(len(self.rows)), self.B * self.world
            chunks = [sorted(order[i:i + 64 * size], key=self.length) for i in range(0, len(order), 64 * size)]
            batches = []
            for c in chunks:
                for i in range(0, len(c), size):
                    if len(c[i:i + size]) < self.world and batches:  # every process needs a row: merge the tail
                        batches[-1] = batches[-1] + c[i:i + size]
                    else:
                        batches.append(c[i:i + size])
            self._batches = ((self.epoch, self.world), [batches[i] for i in rng.permutation(len(batches))])
        return self._batches[1]

    def __len__(self) -> int:
        return len(self.batches())

    def length(self, i: int) -> int:
        return len(self.rows[i][0])

    def collate(self, idx):
        return pad_rows([self.rows[i] for i in idx])

    def largest_batch(self):
        """This process's share of the global batch that fills the most positions (rows x its longest row):
        as long as their longest row, 03's batches peak in memory hours in; train() tries this one before
        the first step. The position does not move: training goes on in the seeded order."""
        def size(b):
            return max(len(b[r::self.world]) for r in range(self.world)) * max(self.length(i) for i in b)
        return self.collate(max(self.batches(), key=size)[self.rank::self.world])

    def split(self, batch, rows: int) -> list:
        return split_rows(batch, rows)

    def next_batch(self):
        idx = self.batches()[self.index]
        self.index += 1
        if self.index == len(self.batches()):
            self.epoch, self.index = self.epoch + 1, 0
        return self.collate(idx[self.rank::self.world])

    def epochs_done(self) -> float:
        """Passes over the training rows so far."""
        return self.epoch + self.index / len(self)

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "world": self.world}

    def load_state(self, state: dict) -> None:
        """The position; a checkpoint of another process count resumes at the same share of the epoch."""
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        old_world = int(state.get("world", self.world))
        if old_world != self.world:
            self.index = min(len(self) - 1, self.index * old_world // self.world)

    def real_token_fraction(self) -> float:
        """Share of the input positions in an epoch's per-process batches (what trains) that are real tokens."""
        real = padded = 0
        for b in self.batches():
            for r in range(self.world):
                x, _ = self.collate(b[r::self.world])
                real, padded = real + int((x != PAD_ID).sum()), padded + x.numel()
        return real / padded

    def eval_batches(self, n_rows: int):
        """The fixed evaluation sample (eval_sample) in batches of similar length."""
        idx = sorted(eval_sample(len(self.rows), n_rows).tolist(), key=self.length)
        return [self.collate(idx[i:i + self.B]) for i in range(0, len(idx), self.B)]


def split_rows(batch, rows: int) -> list:
    """A batch in micro-batches of `rows` rows (the last may have fewer)."""
    x, y = batch
    return list(zip(x.split(rows), y.split(rows)))


def pad_rows(rows):
    """(ids, labels) rows as inputs and targets moved by one: inputs padded with <pad>, targets with -100."""
    width = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    y = torch.full((len(rows), width), IGNORE_ID, dtype=torch.long)
    for k, (ids, labels) in enumerate(rows):
        x[k, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[k, :len(ids) - 1] = torch.tensor(labels[1:])
    return x, y


class PairBatches(DialogBatches):
    """Preference pairs ((chosen ids, labels), (rejected ids, labels)) in DialogBatches' seeded,
    resumable, length-grouped global batches; a batch stacks the chosen rows, then the rejected ones."""

    def length(self, i: int) -> int:
        return max(len(self.rows[i][0][0]), len(self.rows[i][1][0]))

    def collate(self, idx):
        return pad_rows([self.rows[i][0] for i in idx] + [self.rows[i][1] for i in idx])

    def split(self, batch, rows: int) -> list:
        """Micro-batches of `rows` pairs: each keeps its pairs' chosen rows, then their rejected ones."""
        x, y = batch
        n = len(x) // 2
        return [(torch.cat([x[i:i + rows], x[n + i:n + i + rows]]), torch.cat([y[i:i + rows], y[n + i:n + i + rows]]))
                for i in range(0, n, rows)]
