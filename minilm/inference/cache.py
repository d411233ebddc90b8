"""The key/value cache: one row per sequence, each row with its own length.

    cache = KVCache(config, rows=4, max_len=256, device="cpu", dtype=torch.float32)
    model(prompt, cache=cache.prefill(row=2))            # row 2 holds the prompt's keys and values from column 0
    model(last, cache=cache.step(n, width), pos=..., attn_mask=step_mask(cols, width))   # one token per row

forward() only calls `update(layer, k, v)` on what it is given: write the new keys and values, return the ones
to attend to. Each layer has its own tensor (rows, n_head, max_len, head_dim): a compiled step that writes into
views of one shared tensor copied all of it per layer.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values for up to `rows` sequences; lengths[r] is how many positions row r holds."""

    def __init__(self, config, rows: int, max_len: int, device, dtype: torch.dtype):
        shape = (rows, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.rows, self.max_len = rows, max_len
        self.lengths = [0] * rows

    def prefill(self, row: int) -> RowWrite:
        return RowWrite(self, row)

    def step(self, cols: torch.Tensor, width: int) -> StepWrite:
        return StepWrite(self.k, self.v, cols, width)

    def swap(self, i: int, j: int) -> None:
        """Exchange rows i and j (two sequences changing places)."""
        for buf in self.k + self.v:
            row = buf[i].clone()
            buf[i] = buf[j]
            buf[j] = row
        self.lengths[i], self.lengths[j] = self.lengths[j], self.lengths[i]

    def move(self, src: int, dst: int) -> None:
        """Copy row src's filled columns to row dst (the sequence in dst has left)."""
        n = self.lengths[src]
        for buf in self.k + self.v:
            buf[dst, :, :n] = buf[src, :, :n]
        self.lengths[dst] = n


class RowWrite:
    """A prefill of one sequence into row `row` from column 0: store its keys and values, attend to them as they
    are (the ordinary causal attention over the prompt)."""

    def __init__(self, cache: KVCache, row: int):
        self.cache, self.row = cache, row

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.size(2)
        if t > self.cache.max_len:
            raise ValueError(f"the KV cache holds {self.cache.max_len} positions per row: a prefill of {t} does "
                             "not fit")
        self.cache.k[layer][self.row, :, :t] = k[0]
        self.cache.v[layer][self.row, :, :t] = v[0]
        return k, v


class StepWrite:
    """One new token for each of rows 0..n-1, row i's key and value written at column cols[i]; attention reads
    those rows' first `width` columns (step_mask hides what lies past each row's own length)."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], cols: torch.Tensor, width: int):
        self.k, self.v, self.cols, self.width = k, v, cols, width
        self.rows = torch.arange(cols.size(0), device=cols.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.k[layer], self.v[layer]
        keys[self.rows, :, self.cols] = k[:, :, 0].to(keys.dtype)  # index_put does not convert, unlike a slice
        values[self.rows, :, self.cols] = v[:, :, 0].to(values.dtype)
        n = k.size(0)
        if (n, self.width) == (keys.size(0), keys.size(2)):  # the compiled step: whole tensors, no views
            return keys, values
        return keys[:n, :, : self.width], values[:n, :, : self.width]


def step_mask(cols: torch.Tensor, width: int) -> torch.Tensor:
    """(n, 1, 1, width), True where row i may attend: its filled columns 0..cols[i]-1 and the new one, cols[i]."""
    return (torch.arange(width, device=cols.device)[None, :] <= cols[:, None])[:, None, None, :]
