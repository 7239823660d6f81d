"""Linear layers whose matrix products suit decoding on a CPU.

A decoding forward multiplies every weight matrix by a handful of rows: one for plain
decoding, a few for speculative verification, a few per row for a batch. Such products are
bound by reading the weights from memory, and should cost about the same for one row as for
a few. Whether they do depends on the BLAS library's small-matrix kernels. On the 2-core AMD
EPYC machine this project is developed on, ``F.linear`` does poorly there: a SmolLM2-135M
forward after 200 cached tokens takes 40 ms for one new token and 68 / 84 ms for two / three
(the one-row product is a slow matrix-vector kernel; a few rows are computed about row by
row). The same products written as ``W @ x.T`` (one row doubled to two) take 25 / 28 / 35 ms.

:func:`install` makes every plain ``nn.Linear`` of a CPU model pick, per weight shape and
number of rows up to :data:`MAX_ROWS`, whichever of the two products is faster, timed once
per process the first time that size is seen (over every layer of the shape, so that the
weights stream from memory as in a forward). Prefill and training (more rows) keep
``F.linear``. The two products differ by float rounding only (about 1e-5 in SmolLM2's
logits), so greedy answers can differ from transformers' only at near-exact ties.

``ROOTDEFENSE_LINEAR`` chooses the policy: ``auto`` (default), ``stock`` (never install;
transformers as is, bit for bit) or ``transposed`` (always the transposed product in range;
reproducible across runs, since ``auto``'s choice is a timing and could differ between runs
of a noisy machine).
"""

from __future__ import annotations

import os
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .. import paths
from ..errors import InputError

ENV = "ROOTDEFENSE_LINEAR"
MODES = ("auto", "stock", "transposed")
MAX_ROWS = 32  # the widest verify or batched round the decoders run; prefill keeps F.linear
MARGIN = 0.9  # the transposed product must be at least 10% faster to be chosen

# row counts are timed in buckets (a count uses the choice of the smallest bucket >= it)
BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
assert BUCKETS[-1] == MAX_ROWS

# (out, in, dtype, bucket, threads) -> True when the transposed product is faster
_CHOICES: dict[tuple, bool] = {}
_LOADED: set[str] = set()  # homes whose saved choices are read


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise InputError(f"{ENV}={value!r} is not a linear-layer policy; choose one of {', '.join(MODES)}")
    return value


def _transposed(weight: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """``x2 @ weight.T`` computed as ``weight @ x2.T``; one row is doubled first, since a
    one-column product is the same slow matrix-vector kernel as ``F.linear``'s."""
    if x2.shape[0] == 1:
        return torch.mm(weight, x2.expand(2, -1).contiguous().t())[:, :1].t().contiguous()
    return torch.mm(weight, x2.t()).t().contiguous()


def _best_s(fn, reps: int = 3) -> float:
    fn()  # warm (first-call allocations)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _bucket(rows: int) -> int:
    return next(b for b in BUCKETS if b >= rows)


def cpu_name() -> str:
    """The processor's name (the small-matrix kernels' speed, and so every choice, depend on it)."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _machine() -> str:
    """What a saved choice holds for: this processor and torch build."""
    return f"{cpu_name()} | torch {torch.__version__}"


def _load_saved() -> None:
    import json

    path = paths.kernels_file()
    if str(path) in _LOADED:
        return
    _LOADED.add(str(path))
    try:
        saved = json.loads(path.read_text(encoding="utf-8")).get(_machine(), {})
    except (OSError, ValueError, AttributeError):
        return  # none yet, or unreadable: time again (and rewrite it)
    for key, choice in saved.items():
        out, inp, dtype, bucket, threads = key.split(",")
        _CHOICES.setdefault((int(out), int(inp), dtype, int(bucket), int(threads)), bool(choice))


def _save(key: tuple, choice: bool) -> None:
    import json

    path = paths.kernels_file()
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data.setdefault(_machine(), {})[",".join(map(str, key))] = choice
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: the choice holds for this process


def prefers_transposed(weights: list[torch.Tensor], rows: int) -> bool:
    """Whether ``W @ x.T`` beats ``F.linear`` for ``rows`` input rows on this machine, timed
    over ``weights`` (every layer of one shape, each read once, so the weights stream from
    memory as in a forward rather than sitting in cache) at the row count's bucket;
    remembered per weight shape, dtype, bucket and thread count, for this process and (in
    the rootdefense home) for later ones on the same processor and torch."""
    w0 = weights[0]
    bucket = _bucket(rows)
    key = (*w0.shape, str(w0.dtype).replace("torch.", ""), bucket, torch.get_num_threads())
    choice = _CHOICES.get(key)
    if choice is None:
        _load_saved()
        choice = _CHOICES.get(key)
    if choice is None:
        with torch.no_grad():
            x2 = torch.randn(bucket, w0.shape[1], dtype=w0.dtype, device=w0.device)
            stock = _best_s(lambda: [F.linear(x2, w) for w in weights])
            transposed = _best_s(lambda: [_transposed(w, x2) for w in weights])
        choice = _CHOICES[key] = transposed < MARGIN * stock
        _save(key, choice)
    return choice


def calibrate(model: nn.Module) -> float:
    """Time every installed layer shape at every row bucket now (skipping what is already
    known), so that no timing falls inside a decode later; returns the seconds spent."""
    t0 = time.perf_counter()
    groups = {id(m._rd_group): m._rd_group for m in _linears(model) if m.__dict__.get("_rd_policy") == "auto"}
    for group in groups.values():
        for rows in BUCKETS:
            prefers_transposed(group, rows)
    return time.perf_counter() - t0


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.dim() > 1 else 1
    if rows <= MAX_ROWS and (self._rd_policy == "transposed" or prefers_transposed(self._rd_group, rows)):
        y = _transposed(self.weight, x.reshape(rows, x.shape[-1]))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.weight.shape[0])
    return F.linear(x, self.weight, self.bias)


def _linears(model: nn.Module) -> Iterator[nn.Linear]:
    return (m for m in model.modules() if type(m) is nn.Linear)  # not peft's or quantised subclasses


def install(model: nn.Module, policy: str | None = None) -> int:
    """Give every plain ``nn.Linear`` of ``model`` the size-picked product (CPU models only;
    a no-op elsewhere or under policy ``stock``). Returns how many layers it covers."""
    policy = policy or mode()
    if policy not in MODES:
        raise InputError(f"unknown linear-layer policy {policy!r}; choose one of {', '.join(MODES)}")
    if policy == "stock":
        return 0
    layers = [m for m in _linears(model) if m.weight.device.type == "cpu"]
    groups: dict[tuple, list[torch.Tensor]] = {}
    for m in layers:  # the layers of one shape are timed together (see prefers_transposed)
        groups.setdefault((*m.weight.shape, m.weight.dtype), []).append(m.weight)
    for m in layers:
        m._rd_policy, m._rd_group = policy, groups[(*m.weight.shape, m.weight.dtype)]
        m.forward = types.MethodType(_forward, m)
    return len(layers)


def installed(model: nn.Module) -> bool:
    return any("forward" in m.__dict__ for m in _linears(model))


def uninstall(model: nn.Module) -> None:
    for m in _linears(model):
        m.__dict__.pop("forward", None)
        m.__dict__.pop("_rd_policy", None)
        m.__dict__.pop("_rd_group", None)


@contextmanager
def stock_linears(model: nn.Module):
    """Run ``model`` with transformers' own ``F.linear`` inside the block (the bench's
    transformers reference methods), then restore what was installed."""
    saved = {m: (m.__dict__["_rd_policy"], m.__dict__["_rd_group"]) for m in _linears(model)
             if "_rd_policy" in m.__dict__}
    uninstall(model)
    try:
        yield model
    finally:
        for m, (policy, group) in saved.items():
            m._rd_policy, m._rd_group = policy, group
            m.forward = types.MethodType(_forward, m)
