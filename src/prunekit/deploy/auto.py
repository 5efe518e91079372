"""``layout="auto"``: time every fitting layout on the layer's real input, keep the fastest.

Dense is always a candidate and a sparse layout must beat it by ``margin``, so a layer
deployed by ``auto`` is never slower than it was (up to timing noise).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["capture_inputs", "choose", "time_candidates"]


def run_model(model: nn.Module, example_inputs: Any) -> Any:
    """Call ``model`` with a tensor, a tuple of positional args or a dict of keyword args."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def capture_inputs(
    model: nn.Module, layers: dict[str, nn.Module], example_inputs: Any
) -> dict[str, torch.Tensor]:
    """The first input each layer in ``layers`` (``{fqn: module}``) sees on ``example_inputs``."""
    seen: dict[str, torch.Tensor] = {}

    def hook_for(fqn: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if fqn not in seen and args and isinstance(args[0], torch.Tensor):
                seen[fqn] = args[0].detach()

        return hook

    handles = [m.register_forward_pre_hook(hook_for(fqn)) for fqn, m in layers.items()]
    try:
        with torch.inference_mode():
            run_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _timed(fn: Callable[[], Any], cuda: bool) -> float:
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_candidates(
    candidates: dict[str, nn.Module], x: torch.Tensor, budget_s: float = 0.05, max_repeats: int = 30
) -> dict[str, float]:
    """Fastest of the repeated timings of each candidate on ``x``, in milliseconds. Runs
    are interleaved so load drift hits all alike, and the minimum is kept because a busy
    machine only ever adds time; repeats are sized to ``budget_s`` per candidate (>= 5)."""
    cuda = x.is_cuda
    calls = {name: (lambda m=m: m(x)) for name, m in candidates.items()}
    with torch.inference_mode():
        first = {name: max(_timed(fn, cuda), _timed(fn, cuda)) for name, fn in calls.items()}
        repeats = int(min(max_repeats, max(5, budget_s / max(max(first.values()), 1e-6))))
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(repeats):
            for name, fn in calls.items():
                times[name].append(_timed(fn, cuda))
    return {name: 1e3 * min(ts) for name, ts in times.items()}


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
