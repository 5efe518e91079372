"""Structured pruning: prunekit's dependency-graph engine vs Torch-Pruning (pinned in
the ``bench`` extra) vs the dense model, side by side in one process.

For ResNet-18 / MobileNetV2 / ViT-style models at 50% of channels with L2 importance:
MACs (FlopCounterMode), batch-1 and batch-8 latency, plan+apply time; then a coverage
table: which small zoo models each library shrinks (and, for prunekit, exactly).

    python -m benchmarks.structured [--quick]
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks._common import interleaved, parse_args, ratio, write_results
from prunekit.structured.engine import prune
from tests.structured.zoo import MobileNetV2, ResNet, ViT, check_equivalent, small_zoo

try:
    import torch_pruning as tp
except ImportError:  # the bench extra is not installed: compare with the dense model only
    tp = None


def _macs(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops() // 2


def _tp_ignored(model: nn.Module) -> list[nn.Module]:
    """The output layer, and attention projections whose head sizes the model's code
    hard-codes (Torch-Pruning would otherwise break the head reshape)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    heads = [m for n, m in linears if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")]
    return [linears[-1][1], *heads]


def _prunekit(model: nn.Module, x: torch.Tensor) -> nn.Module:
    prune(model, x, ratio=0.5, importance="l2").apply()
    return model


def _torch_pruning(model: nn.Module, x: torch.Tensor) -> nn.Module:
    pruner = tp.pruner.MetaPruner(
        model,
        x,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=_tp_ignored(model),
    )
    pruner.step()
    return model


PRUNERS: dict[str, Callable[[nn.Module, torch.Tensor], nn.Module]] = {"prunekit": _prunekit}
if tp is not None:
    PRUNERS["torch-pruning"] = _torch_pruning


def _plan_times(base: nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds to plan and apply, each run on a fresh deep copy (copy untimed)."""
    fresh: dict[str, nn.Module] = {}
    return interleaved(
        {k: (lambda k=k, f=f: f(fresh[k], x)) for k, f in PRUNERS.items()},
        repeats=repeats,
        setup=lambda k: fresh.__setitem__(k, copy.deepcopy(base)),
    )


def _latencies(models: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    with torch.inference_mode():
        return interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, repeats)


def _widths(model: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in model.state_dict().values()]


def _speed_rows(
    name: str, make: Callable[[], nn.Module], size: int, repeats: int
) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    base = make().eval()
    x1, x8 = torch.randn(1, 3, size, size), torch.randn(8, 3, size, size)
    plan_times = _plan_times(base, x1, max(1, repeats // 2))
    models = {"dense": base, **{k: f(copy.deepcopy(base), x1).eval() for k, f in PRUNERS.items()}}
    b1 = _latencies(models, x1, 3 * repeats)
    b8 = _latencies(models, x8, repeats)
    dense_macs = _macs(base, x1)
    peer = models.get("torch-pruning")
    rows = []
    for key, model in models.items():
        macs = _macs(model, x1)
        rows.append({
            "model": name, "library": key, "GMACs": macs / 1e9,
            "MACs ratio": ratio(dense_macs, macs),
            "params (M)": sum(p.numel() for p in model.parameters()) / 1e6,
            "b1 ms": b1[key] * 1e3, "b1 speed-up": ratio(b1["dense"], b1[key]),
            "b8 ms": b8[key] * 1e3, "b8 speed-up": ratio(b8["dense"], b8[key]),
            "plan+apply s": plan_times.get(key, 0.0),
            "same widths as TP": "-" if peer is None or key in ("dense", "torch-pruning")
            else str(_widths(model) == _widths(peer)).lower(),
        })  # fmt: skip
    return rows


class _HFModel(nn.Module):
    """A small ``transformers`` model returning its last hidden state (a tensor, so that
    every library's output check applies); captured by prunekit through torch.export, as
    torch.fx cannot trace it."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        import transformers

        if kind == "bert":
            config = transformers.BertConfig(
                vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=32,
            )  # fmt: skip
            self.model = transformers.BertModel(config)
        else:  # GPT-2: transformers' Conv1D layers, q/k/v fused and split by split_size
            config = transformers.GPT2Config(
                vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=32,
                use_cache=False, bos_token_id=None, eos_token_id=None,
            )  # fmt: skip
            self.model = transformers.GPT2Model(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).last_hidden_state


def _coverage_zoo() -> dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]]:
    zoo = small_zoo()
    try:
        import transformers  # noqa: F401
    except ImportError:  # the llm/test extras are not installed
        return zoo
    for kind in ("bert", "gpt2"):
        zoo[f"{kind} (transformers)"] = (
            lambda kind=kind: _HFModel(kind), lambda: torch.randint(0, 100, (2, 16))
        )
    return zoo


def _coverage() -> list[dict[str, Any]]:
    rows = []
    for name, (make, inp) in _coverage_zoo().items():
        row: dict[str, Any] = {"model": name}
        row["prunekit"] = _try(
            lambda make=make, inp=inp: check_equivalent(make(), inp(), ratio=0.5) and True
        )
        if tp is not None:
            row["torch-pruning"] = _try(
                lambda make=make, inp=inp: _shrinks(_torch_pruning, make, inp)
            )
        row["torch.ao (reference)"] = _try(
            lambda make=make, inp=inp: _shrinks(_reference, make, inp)
        )
        rows.append(row)
    return rows


def _shrinks(
    fn: Callable[[nn.Module, torch.Tensor], nn.Module], make: Callable, inp: Callable
) -> bool:
    torch.manual_seed(0)
    model, x = make().eval(), inp()
    before, shape = sum(p.numel() for p in model.parameters()), model(x).shape
    pruned = fn(model, x)
    return pruned(x).shape == shape and sum(p.numel() for p in pruned.parameters()) < before


def _reference(model: nn.Module, x: torch.Tensor) -> nn.Module:
    from torch.ao.pruning._experimental.pruner import SaliencyPruner

    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]
    pruner = SaliencyPruner({})
    pruner.prepare(model, [{"tensor_fqn": f"{n}.weight", "sparsity_level": 0.5} for n in layers])
    pruner.enable_mask_update = True
    pruner.step()
    return pruner.prune()


def _try(fn: Callable[[], bool]) -> str:
    try:
        return "yes" if fn() else "no (wrong shape / no shrink)"
    except Exception as exc:  # a peer's failure is a result, not a crash of the benchmark
        return f"fails: {type(exc).__name__}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    size, repeats, dim = (64, 1, 96) if args.quick else (224, args.repeats, 384)
    specs = [
        ("ResNet-18", ResNet),
        ("MobileNetV2", MobileNetV2),
        (
            "ViT-S/16 (6 blocks)",
            lambda: ViT(image=size, patch=16, dim=dim, depth=6, heads=6, mlp=4 * dim, classes=1000),
        ),
    ]
    rows = [r for name, make in specs for r in _speed_rows(name, make, size, repeats)]
    notes = (
        f"{size}x{size} inputs, 50% of channels per group, L2 importance, output layer kept; "
        "speed-ups are dense / pruned latency (higher is better; medians of 15 batch-1 "
        "and 5 batch-8 interleaved runs on a shared 2-core machine: "
        "models with identical widths differ only by noise); "
        f"torch-pruning {getattr(tp, '__version__', 'not installed')}; "
        "Torch-Pruning is told to ignore q/k/v projections of the ViT (its head reshape "
        "is hard-coded), which prunekit finds by itself."
    )
    write_results("structured", rows, notes=notes, quick=args.quick)
    write_results(
        "structured-coverage",
        _coverage(),
        notes="prunekit: shrunk output equals the masked model within 1e-5 relative; "
        "peers: runs, keeps output shape, fewer parameters.",
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
