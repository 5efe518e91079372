"""What the tool reports about a model: parameters, nonzeros, MACs, size, latency, layers.

MACs are counted by ``torch.utils.flop_counter`` on one example input (dense MACs: a
zero weight still costs a multiply in a dense kernel). Size on disk is the size of the
pickle-free checkpoint, plus its gzip size, which is where unstructured sparsity shows.
"""

from __future__ import annotations

import gzip
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunekit.tool.checkpoint import WEIGHTS, save

__all__ = ["LayerRow", "Summary", "layer_table", "summarize"]


@dataclass(frozen=True)
class LayerRow:
    """One weighted layer of the per-layer table."""

    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    nonzero: int
    macs: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.params if self.params else 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"shape": list(self.shape), "sparsity": self.sparsity}


@dataclass(frozen=True)
class Summary:
    """The before/after figures of one model."""

    params: int
    nonzero: int
    macs: int
    size_bytes: int
    gzip_bytes: int
    latency_ms: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run(model: nn.Module, inputs: tuple) -> Any:
    with torch.inference_mode():
        return model(*inputs)


def macs_per_module(model: nn.Module, inputs: tuple) -> dict[str, int]:
    """MACs per module fqn ("" for the whole model), from one forward pass."""
    with FlopCounterMode(display=False) as counter:
        _run(model, inputs)
    root = type(model).__name__
    out: dict[str, int] = {}
    for key, counts in counter.get_flop_counts().items():
        if key == "Global":
            out[""] = sum(counts.values()) // 2
        elif key.startswith(root + "."):
            out[key[len(root) + 1 :]] = sum(counts.values()) // 2
    out.setdefault("", 0)
    return out


def layer_table(model: nn.Module, inputs: tuple | None) -> list[LayerRow]:
    """Every module that owns a ``weight`` tensor, in definition order."""
    macs = macs_per_module(model, inputs) if inputs is not None else {}
    rows = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() == 0:
            continue
        rows.append(LayerRow(
            name=name, kind=type(module).__name__, shape=tuple(weight.shape),
            params=weight.numel(), nonzero=int(torch.count_nonzero(weight.detach())),
            macs=macs.get(name, 0),
        ))
    return rows


def disk_size(model: nn.Module) -> tuple[int, int]:
    """Bytes of the saved weights, raw and gzip-compressed."""
    with tempfile.TemporaryDirectory() as tmp:
        save(model, Path(tmp) / "ckpt")
        raw = (Path(tmp) / "ckpt" / WEIGHTS).read_bytes()
    return len(raw), len(gzip.compress(raw, compresslevel=6))


def latency_ms(model: nn.Module, inputs: tuple, repeats: int = 30) -> float:
    """Median milliseconds of one no-grad forward, after a warm-up."""
    for _ in range(3):
        _run(model, inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _run(model, inputs)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def _eval_mode(model: nn.Module) -> None:
    """Inference mode for measuring; a ``torch.export`` module refuses ``eval()`` because
    it always runs as exported, so it is left as it is."""
    try:
        model.eval()
    except NotImplementedError:
        return


def summarize(model: nn.Module, inputs: tuple, repeats: int = 30) -> Summary:
    """Parameters, nonzeros, MACs, checkpoint size and latency of ``model`` on ``inputs``."""
    _eval_mode(model)
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())
    size, packed = disk_size(model)
    return Summary(
        params=params, nonzero=nonzero, macs=macs_per_module(model, inputs)[""],
        size_bytes=size, gzip_bytes=packed, latency_ms=latency_ms(model, inputs, repeats),
    )
