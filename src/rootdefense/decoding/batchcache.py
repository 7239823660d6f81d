"""The key/value cache of a running batch.

Every cache row (a request's base row, and its expert row while it has one) keeps its own
0/1 ``past`` mask over the cache's columns and its own next position id. Rows keep
different numbers of entries per round (a verified chain, one chosen candidate, nothing),
so columns are not cut per row: a column a row did not keep stays masked out for that row,
and since position ids are given per row, the holes change nothing. Columns no row uses
are dropped (:func:`trim` at the ends each step, :func:`compact` everywhere when a row
leaves). A row joins by a prefill of its own that is left-padded into
the batch (:func:`merge`); a row that leaves takes its cache rows with it (:func:`select`).
"""

from __future__ import annotations

import torch

from ..errors import ModelError


def _checked(cache, width: int):
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is None or keys.shape[-2] != width:
            raise ModelError(f"{type(layer).__name__} cache layers are not supported by batched decoding "
                             "(sliding-window or recurrent caches); use a model with full attention")
        yield layer


def select(cache, past: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Keep the cache rows ``rows`` (in that order); returns their ``past``."""
    idx = torch.tensor(rows, dtype=torch.long, device=past.device)
    for layer in _checked(cache, past.shape[1]):
        layer.keys, layer.values = layer.keys[idx], layer.values[idx]
    return past[idx]


def trim(cache, past: torch.Tensor) -> torch.Tensor:
    """Drop the leading and trailing columns no row uses; returns the trimmed ``past``."""
    used = past.any(dim=0).nonzero()
    if not used.numel():
        return past
    first, last = int(used[0, 0]), int(used[-1, 0]) + 1
    if first == 0 and last == past.shape[1]:
        return past
    return _cut(cache, past, first, last)


def compact(cache, past: torch.Tensor) -> torch.Tensor:
    """Drop every column no row uses (holes included; a copy, done when rows leave);
    returns the compacted ``past``."""
    used = past.any(dim=0)
    if bool(used.all()):
        return past
    cols = used.nonzero()[:, 0]
    for layer in _checked(cache, past.shape[1]):
        layer.keys, layer.values = layer.keys[:, :, cols], layer.values[:, :, cols]
    return past[:, cols]


def _cut(cache, past, first: int, last: int) -> torch.Tensor:
    for layer in _checked(cache, past.shape[1]):
        layer.keys, layer.values = layer.keys[:, :, first:last], layer.values[:, :, first:last]
    return past[:, first:last]


def _pad_left(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def merge(cache, past: torch.Tensor, new_cache, new_past: torch.Tensor) -> torch.Tensor:
    """Append the rows of ``new_cache`` (a prefill of joining rows) to ``cache``, the shorter
    of the two left-padded with masked-out columns; returns the joint ``past``."""
    c, p = past.shape[1], new_past.shape[1]
    width = max(c, p)
    for layer, new in zip(_checked(cache, c), _checked(new_cache, p), strict=True):
        layer.keys = torch.cat([_pad_left(layer.keys, width - c, 2), _pad_left(new.keys, width - p, 2)])
        layer.values = torch.cat([_pad_left(layer.values, width - c, 2), _pad_left(new.values, width - p, 2)])
    return torch.cat([_pad_left(past, width - c, 1), _pad_left(new_past, width - p, 1)])


def move_slots(cache, c: int, width: int, rows: list[int], chosen: list[int]) -> None:
    """Copy slot ``chosen[i]`` of cache row ``rows[i]`` (column ``c + chosen[i]``) to column
    ``c``, in place: a pool's chosen candidate becomes the row's one kept entry."""
    if not rows:
        return
    device = cache.layers[0].keys.device
    r = torch.tensor(rows, dtype=torch.long, device=device)
    j = torch.tensor(chosen, dtype=torch.long, device=device)
    for layer in _checked(cache, c + width):
        layer.keys[r, :, c] = layer.keys[r, :, c + j]
        layer.values[r, :, c] = layer.values[r, :, c + j]


def round_mask(past: torch.Tensor, sizes: list[int], causal: list[bool], width: int, dtype) -> torch.Tensor | None:
    """Additive 4D mask (rows, 1, width, C + width) for one forward: cache row b's slot i
    sees the row's kept past and itself; a chain's slots (``causal``) also see the chain
    before them, a pool's candidates only themselves; slots past ``sizes[b]`` are padding
    and see only themselves. None where the model's own causal mask is the same (every
    row has kept every column and fills the round with a chain)."""
    if bool(past.all()) and all(n == width and (c or n == 1) for n, c in zip(sizes, causal, strict=True)):
        return None
    bsz, c = past.shape
    allowed = torch.zeros((bsz, width, c + width), dtype=torch.bool, device=past.device)
    allowed[:, :, :c] = past.bool()[:, None, :]
    idx = torch.arange(width, device=past.device)
    allowed[:, idx, c + idx] = True
    tril = torch.tril(torch.ones((width, width), dtype=torch.bool, device=past.device))
    for b, (n, chain) in enumerate(zip(sizes, causal, strict=True)):
        allowed[b, n:, :c] = False
        if chain:
            allowed[b, :n, c:c + n] = tril[:n, :n]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=past.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
