"""``layout="auto"``: time every fitting layout on the layer's real input, keep the fastest.

Dense is always a candidate and a sparse layout must beat it by ``margin``, so a layer
deployed by ``auto`` is never slower than it was (up to timing noise).
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

__all__ = [
    "RUN_ERRORS",
    "Args",
    "capture_args",
    "choose",
    "confirmed_speedup",
    "paired_samples",
    "time_candidates",
]


def run_model(model: nn.Module, example_inputs: Any) -> Any:
    """Call ``model`` with a tensor, a tuple of positional args or a dict of keyword args."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


Args = tuple[Any, ...]  # the positional args of one call: what a module is timed on
# What torch's sparse constructors and kernels raise for an unsupported dtype, shape or
# device, and what a model raises for an input it cannot take (a transposed view).
RUN_ERRORS = (RuntimeError, ValueError, TypeError, NotImplementedError)


def _call(module: nn.Module, x: torch.Tensor | Args) -> Any:
    """``module`` on ``x``: one tensor, or a tuple of positional args."""
    return module(*x) if isinstance(x, tuple) else module(x)


def _is_cuda(x: torch.Tensor | Args) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in tree_leaves(x))


def capture_args(
    model: nn.Module, modules: dict[str, nn.Module], example_inputs: Any
) -> dict[str, Args]:
    """The positional args (keywords bound to their positions) of the first call of each
    module in ``modules`` (``{fqn: module}``) on ``example_inputs``."""
    seen: dict[str, Args] = {}

    def hook_for(fqn: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Args, kwargs: dict[str, Any]) -> None:
            if fqn in seen:
                return
            if kwargs:  # a bank called with keywords is timed with them in place
                args = inspect.signature(module.forward).bind(*args, **kwargs).args
            seen[fqn] = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)

        return hook

    handles = [m.register_forward_pre_hook(hook_for(fqn), with_kwargs=True)
               for fqn, m in modules.items()]
    try:
        with torch.inference_mode():
            run_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _timed(fn: Callable[[], Any], calls: int, cuda: bool) -> float:
    """Seconds per call over ``calls`` calls, after one untimed call that wakes the
    kernel's threads and brings its weights into cache (the previous candidate evicted
    them), so each candidate is timed in its steady state."""
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls


def _calls_per_sample(calls: list[Callable[[], Any]], sample_s: float, cuda: bool) -> int:
    """One number of back-to-back calls for every function in ``calls``, sized so that the
    slowest one's sample lasts about ``sample_s`` (from one timed call each). The calls
    after a switch run slower than the steady state (caches, prefetchers), so samples
    of unequal length would bias a comparison by that share."""
    slowest = max(_timed(fn, 1, cuda) for fn in calls)
    return max(1, int(sample_s / max(slowest, 1e-7)))


def time_candidates(
    candidates: dict[str, nn.Module],
    x: torch.Tensor | Args,
    budget_s: float = 0.1,
    sample_s: float = 0.02,
    min_samples: int = 5,
) -> dict[str, float]:
    """Median milliseconds per call of each candidate on ``x``.

    Each sample runs a candidate back to back (as it runs in a model: its weights stay in
    cache, and a layer taking microseconds is not timed below the clock's noise), every
    candidate the same number of calls, which the slowest runs in about ``sample_s``;
    samples are interleaved so load drift hits all candidates alike, and their number is
    ``budget_s / sample_s`` (at least ``min_samples``).
    """
    cuda = _is_cuda(x)
    calls = {name: (lambda m=m: _call(m, x)) for name, m in candidates.items()}
    with torch.inference_mode():
        inner = _calls_per_sample(list(calls.values()), sample_s, cuda)
        samples = max(min_samples, int(budget_s / sample_s))
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(samples):
            for name, fn in calls.items():
                times[name].append(_timed(fn, inner, cuda))
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def paired_samples(
    base: nn.Module, other: nn.Module, x: torch.Tensor | Args, blocks: int,
    sample_s: float = 0.02,
) -> tuple[list[float], list[float]]:
    """Seconds per call of ``base`` and of ``other`` in each of ``blocks`` ABBA blocks
    (base, other, other, base), timed back to back after one warm-up sample of each.

    In every block each model runs one sample right after the other model and one right
    after itself. A switch slows the first calls (caches, prefetchers: about 8 % of a
    one-token sample here), so the ratio of a single AB pair depends on its order and
    flips between two modes; a block's mean cancels that, and drift slower than a block.
    Both run the same number of calls per sample, which the slower runs in about
    ``sample_s``."""
    cuda = _is_cuda(x)
    with torch.inference_mode():
        calls = [lambda m=model: _call(m, x) for model in (base, other)]
        inner = _calls_per_sample(calls, sample_s, cuda)
        _timed(calls[1], inner, cuda)
        _timed(calls[0], inner, cuda)  # every block now starts like the next one
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(blocks):
            block = [0.0, 0.0]
            for k in (0, 1, 1, 0):
                block[k] += _timed(calls[k], inner, cuda) / 2
            times[0].append(block[0])
            times[1].append(block[1])
    return times


def confirmed_speedup(dense: nn.Module, sparse: nn.Module, x: torch.Tensor | Args,
                      blocks: int = 3) -> float:  # fmt: skip
    """Median over ABBA blocks of ``time(dense) / time(sparse)``: a second, paired look at
    a layout the interleaved round picked, which a burst of load may have favoured."""
    dense_s, sparse_s = paired_samples(dense, sparse, x, blocks)
    return statistics.median(d / s for d, s in zip(dense_s, sparse_s, strict=True))


def choose(times_ms: dict[str, float], margin: float) -> tuple[str, str]:
    """``(name, reason)``: the fastest sparse candidate if it beats ``dense`` by ``margin``."""
    dense = times_ms["dense"]
    sparse = {k: v for k, v in times_ms.items() if k != "dense"}
    if not sparse:
        return "dense", "no sparse layout fits this weight"
    best = min(sparse, key=sparse.__getitem__)
    speedup = dense / sparse[best] if sparse[best] > 0 else float("inf")
    summary = f"{best} {sparse[best]:.3f} ms vs dense {dense:.3f} ms ({speedup:.2f}x)"
    if sparse[best] < dense * (1.0 - margin):
        return best, f"fastest: {summary}"
    return "dense", f"no layout beats dense by {margin:.0%}: {summary}"
