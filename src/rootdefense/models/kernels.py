"""Linear layers that keep verification cheap on a CPU.

Speculative decoding pays off when a forward over a few new tokens costs about what a
forward over one costs: the weights are read from memory once either way. On some CPUs the
BLAS library does not behave so for ``F.linear``: on the 2-core AMD EPYC machine this project
is developed on, the matrix products of a SmolLM2-135M forward take 15 ms for one new token
and 28 / 41 ms for two / three (its small-matrix kernel computes row by row), while the same
products written as ``W @ x.T`` take 12 / 16 ms. A 3-token verify forward then costs 0.96x a
one-token forward instead of 1.94x.

:func:`install` makes every ``nn.Linear`` of a CPU model pick, per weight shape and number of
rows, whichever of the two products is faster, measured once per process the first time that
size is seen (a few ms). Inputs of one row, and above :data:`MAX_ROWS` rows (prefill,
training), keep ``F.linear``. The two products differ by float rounding only (about 1e-5 in
SmolLM2's logits); at one row they are the same kernel and give identical outputs.

``ROOTDEFENSE_LINEAR`` chooses the policy: ``auto`` (default), ``stock`` (never install;
transformers as is) or ``transposed`` (always the transposed product in range; reproducible
across runs, since ``auto``'s choice is a timing and could differ between runs of a noisy
machine).
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

from ..errors import InputError

ENV = "ROOTDEFENSE_LINEAR"
MODES = ("auto", "stock", "transposed")
MAX_ROWS = 32  # the widest verify or batched round the decoders run; prefill keeps F.linear
MARGIN = 0.9  # the transposed product must be at least 10% faster to be chosen

# (out, in, dtype, rows, threads) -> True when the transposed product is faster
_CHOICES: dict[tuple, bool] = {}


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise InputError(f"{ENV}={value!r} is not a linear-layer policy; choose one of {', '.join(MODES)}")
    return value


def _transposed(weight: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    return torch.mm(weight, x2.t()).t().contiguous()


def _best_ms(fn, reps: int = 3) -> float:
    fn()  # warm (first-call allocations)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def prefers_transposed(weight: torch.Tensor, rows: int) -> bool:
    """Whether ``W @ x.T`` beats ``F.linear`` for ``rows`` input rows on this machine (timed
    once per weight shape, dtype, row count and thread count; then remembered)."""
    key = (*weight.shape, weight.dtype, rows, torch.get_num_threads())
    choice = _CHOICES.get(key)
    if choice is None:
        with torch.no_grad():
            x2 = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
            stock = _best_ms(lambda: F.linear(x2, weight))
            transposed = _best_ms(lambda: _transposed(weight, x2))
        choice = _CHOICES[key] = transposed < MARGIN * stock
    return choice


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.dim() > 1 else 1
    if 1 < rows <= MAX_ROWS and (self._rd_policy == "transposed" or prefers_transposed(self.weight, rows)):
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
    n = 0
    for m in _linears(model):
        if m.weight.device.type != "cpu":
            continue
        m._rd_policy = policy
        m.forward = types.MethodType(_forward, m)
        n += 1
    return n


def installed(model: nn.Module) -> bool:
    return any("forward" in m.__dict__ for m in _linears(model))


def uninstall(model: nn.Module) -> None:
    for m in _linears(model):
        m.__dict__.pop("forward", None)
        m.__dict__.pop("_rd_policy", None)


@contextmanager
def stock_linears(model: nn.Module):
    """Run ``model`` with transformers' own ``F.linear`` inside the block (the bench's
    transformers reference methods), then restore what was installed."""
    policies = {m: m.__dict__.get("_rd_policy") for m in _linears(model)}
    uninstall(model)
    try:
        yield model
    finally:
        for m, policy in policies.items():
            if policy is not None:
                m._rd_policy = policy
                m.forward = types.MethodType(_forward, m)
