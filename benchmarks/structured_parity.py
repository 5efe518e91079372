"""Reference-compatible structured pruners: prunekit.structured vs
torch.ao.pruning._experimental.pruner, side by side in one process.

Rows: FPGM ``step()`` time (vectorised row flattening), ``prune()`` time on a deep chain
(type-indexed pattern lookup vs every pattern at every node); a second table says which
chains each library shrinks *correctly* (pruned outputs == masked outputs).

    python -m benchmarks.structured_parity [--quick]
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.pruning._experimental import pruner as ref

import prunekit.structured as ps
from benchmarks._common import interleaved, parse_args, ratio, write_results

LIBS = {"torch.ao": ref, "prunekit": ps}


def _fpgm_row(quick: bool, repeats: int) -> dict:
    rows, cols, layers = (256, 64, 2) if quick else (2048, 256, 4)
    model = nn.Sequential(*[nn.Linear(cols, rows, bias=False) for _ in range(layers)])
    config = [{"tensor_fqn": f"{i}.weight"} for i in range(layers)]
    pruners = {}
    for name, lib in LIBS.items():
        pruners[name] = lib.FPGMPruner(0.3)
        pruners[name].prepare(copy.deepcopy(model), copy.deepcopy(config))
    times = interleaved({n: p.step for n, p in pruners.items()}, repeats)
    return {"case": f"FPGM step, {layers} x Linear({cols}, {rows})", **_times(times)}


def _times(times: dict[str, float]) -> dict:
    return {
        "torch.ao (ms)": times["torch.ao"] * 1e3,
        "prunekit (ms)": times["prunekit"] * 1e3,
        "ratio": ratio(times["torch.ao"], times["prunekit"]),
    }


def _prune_row(quick: bool, repeats: int) -> dict:
    depth = 8 if quick else 64
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(32, 4))
    config = [{"tensor_fqn": f"{2 * i}.weight"} for i in range(depth)]
    ready: dict[str, object] = {}

    def setup(name: str) -> None:
        pruner = LIBS[name].SaliencyPruner({"sparsity_level": 0.5})
        pruner.prepare(copy.deepcopy(model), copy.deepcopy(config))
        pruner.step()
        ready[name] = pruner

    times = interleaved({n: lambda n=n: ready[n].prune() for n in LIBS}, repeats, setup=setup)
    return {"case": f"prune(), {depth} x (Linear → ReLU)", **_times(times)}


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(F.relu(self.a(x)) + x)


class _FanOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.a(x))
        return self.b(h) + self.c(h)


class _Functional(nn.Module):
    def __init__(self, act: Callable) -> None:
        super().__init__()
        self.a, self.b, self.act = nn.Linear(8, 8), nn.Linear(8, 4), act

    def forward(self, x):
        return self.b(self.act(self.a(x)))


def _coverage_models() -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    seq = nn.Sequential
    return {
        "Linear → ReLU → Linear": (lambda: seq(nn.Linear(8, 8), nn.ReLU(),
                                               nn.Linear(8, 4)), (4, 8)),
        "Conv → BN → ReLU → Conv": (lambda: seq(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                                nn.Conv2d(8, 4, 3)), (2, 3, 9, 9)),
        "Conv → BN → ReLU → Conv(padding=1)": (lambda: seq(nn.Conv2d(3, 8, 3, bias=False),
                                                           nn.BatchNorm2d(8), nn.ReLU(),
                                                           nn.Conv2d(8, 4, 3, padding=1)),
                                               (2, 3, 9, 9)),
        "Conv(bias) → ReLU → Conv(padding=1), prune_bias=False": (
            lambda: seq(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)),
            (2, 3, 9, 9)),
        "Linear → Dropout → Linear": (lambda: seq(nn.Linear(8, 8), nn.Dropout(),
                                                  nn.Linear(8, 4)), (4, 8)),
        "Conv1d → ReLU → Conv1d": (lambda: seq(nn.Conv1d(3, 8, 3), nn.ReLU(),
                                               nn.Conv1d(8, 4, 3)), (2, 3, 12)),
        "Conv → ReLU → Conv(padding='same')": (lambda: seq(nn.Conv2d(3, 8, 3, bias=False),
                                                           nn.ReLU(), nn.Conv2d(8, 4, 3,
                                                           padding="same")), (2, 3, 9, 9)),
        "Linear → F.relu → 2 Linears (fan-out)": (_FanOut, (4, 8)),
        "Linear → torch.relu → Linear": (lambda: _Functional(torch.relu), (4, 8)),
        "residual add": (_Residual, (4, 8)),
    }


def _outcome(lib, name: str, make, shape) -> str:
    torch.manual_seed(0)
    model = make().eval()
    first = next(n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d,
                                                                        nn.Conv2d)))
    for m in model.modules():  # non-trivial BatchNorm statistics, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            nn.init.uniform_(m.bias, -1, 1)
    pruner = lib.SaliencyPruner({"sparsity_level": 0.5})
    prune_bias = "prune_bias=False" not in name
    pruner.prepare(model, [{"tensor_fqn": f"{first}.weight", "prune_bias": prune_bias}])
    pruner.step()
    x = torch.randn(shape)
    with torch.no_grad():
        masked = model(x)
        try:
            pruned = pruner.prune()
        except Exception as err:  # the coverage table reports what each library does
            return f"refused ({type(err).__name__})"
        try:
            out = pruned(x)
        except Exception as err:
            return f"BROKEN model ({type(err).__name__} at run time)"
    shrunk = model.get_submodule(first).weight.shape[0] < 8
    if out.shape == masked.shape and torch.allclose(out, masked, atol=1e-5):
        return "shrunk, exact" if shrunk else "kept width, exact"
    return "WRONG outputs"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    repeats = 3 if args.quick else args.repeats
    rows = [_fpgm_row(args.quick, repeats), _prune_row(args.quick, repeats)]
    coverage = [
        {"case": name, **{lib_name: _outcome(lib, name, make, shape)
                          for lib_name, lib in LIBS.items()}}
        for name, (make, shape) in _coverage_models().items()
    ]
    write_results(
        "structured_parity", rows, quick=args.quick,
        notes="Median milliseconds; ratio = torch.ao / prunekit (> 1: prunekit faster).",
    )
    write_results(
        "structured_parity_coverage", coverage, quick=args.quick,
        notes="What prune() does when the first layer of each chain is pruned at 50% "
        "(exact: pruned outputs == masked outputs within 1e-5).",
    )


if __name__ == "__main__":
    main()
