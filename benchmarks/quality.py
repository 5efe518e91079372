"""Accuracy after pruning, on real data, prunekit beside its peers.

Fashion-MNIST (Debian ``dataset-fashion-mnist``, full 10k test set), a small CNN trained
here on the CPU. Unstructured: gradual pruning to 80/90/95% with a cubic schedule and the
same training budget for prunekit (``GlobalSparsifier``, LAMP), torch.ao.pruning
(``WeightNormSparsifier`` + ``CubicSL``) and global magnitude
(``torch.nn.utils.prune.global_unstructured`` at the same schedule). Structured:
30/50/70% of the channels, then one short fine-tune (the same recipe for every method),
prunekit's engine vs Torch-Pruning with the same (group L2) importance, over several
fine-tune seeds (batch orders): every seed's accuracy is reported, with mean and std.

    python -m benchmarks.quality [--quick]
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from benchmarks._common import RESULTS, parse_args, write_results
from benchmarks.quality_data import EpochLoader, load
from prunekit.structured.engine import prune as structured_prune

FULL = {"dense_epochs": 4, "prune_epochs": 2, "finetune_epochs": 1, "batch": 128,
        "prune_every": 25, "widths": (16, 32), "hidden": 128, "seeds": (0, 1, 2)}
QUICK = {"dense_epochs": 1, "prune_epochs": 1, "finetune_epochs": 1, "batch": 50,
         "prune_every": 2, "widths": (8, 16), "hidden": 32, "seeds": (0, 1)}
FINETUNE_LR, LABEL_SMOOTHING = 2e-3, 0.1
UNSTRUCTURED = (0.8, 0.9, 0.95)
CHANNELS = (0.3, 0.5, 0.7)


class CNN(nn.Module):
    """Two conv-BN-ReLU-pool blocks, then a hidden Linear and the classifier."""

    def __init__(self, side: int, widths: tuple[int, int], hidden: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, widths[0], 3, padding=1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.conv2 = nn.Conv2d(widths[0], widths[1], 3, padding=1)
        self.bn2 = nn.BatchNorm2d(widths[1])
        self.fc1 = nn.Linear(widths[1] * (side // 4) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum())
                  for i in range(0, len(y), 1000))
    return 100.0 * correct / len(y)


def _sgd(model: nn.Module, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """The fine-tuning optimizer every unstructured method gets: SGD with momentum and
    weight decay, learning rate decayed linearly to zero."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1 - t / steps))


def _weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _peer_loop(model: nn.Module, loader: EpochLoader, epochs: int, every: int,
               on_event: Callable[[], None]) -> None:
    """The same loop as ``prunekit.gradual_prune``, for the peers' own sparsifiers."""
    opt, sched = _sgd(model, epochs * len(loader))
    steps = 0
    for _ in range(epochs):
        model.train()
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            sched.step()
            steps += 1
            if steps % every == 0:
                on_event()


def _events(cfg: dict[str, Any], loader: EpochLoader) -> int:
    """Pruning events in the schedule: the first 60% of the steps, one per prune_every."""
    return max(1, int(0.6 * cfg["prune_epochs"] * len(loader)) // cfg["prune_every"])


def run_prunekit(model: nn.Module, level: float, cfg: dict[str, Any], loader: EpochLoader) -> None:
    sparsifier = prunekit.GlobalSparsifier(sparsity_level=level, score="lamp")
    sparsifier.prepare(model, None)
    sched = prunekit.CubicSL(sparsifier, init_sl=0.0, delta_t=1, total_t=_events(cfg, loader))
    opt, lr = _sgd(model, cfg["prune_epochs"] * len(loader))
    prunekit.gradual_prune(model, loader, opt, sparsifier, sched, epochs=cfg["prune_epochs"],
                           prune_every=cfg["prune_every"], lr_scheduler=lr)
    sparsifier.squash_mask()


def run_torch_ao(model: nn.Module, level: float, cfg: dict[str, Any], loader: EpochLoader) -> None:
    from torch.ao import pruning as ao

    # the reference's WeightNormSparsifier cannot mask 4-D conv weights (its mask reshape
    # fails), so it prunes the Linear weights, to a level that gives the same overall count
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    total = sum(m.weight.numel() for m, _ in _weights(model))
    linear_total = sum(m.weight.numel() for m in linears.values())
    sparsifier = ao.WeightNormSparsifier(sparsity_level=min(0.99, level * total / linear_total),
                                         sparse_block_shape=(1, 1), zeros_per_block=1)
    config = [{"tensor_fqn": f"{n}.weight"} for n in linears]
    sparsifier.prepare(model, config)
    sched = ao.CubicSL(sparsifier, init_sl=0.0, delta_t=1, total_t=_events(cfg, loader))
    sparsifier.step()

    def event() -> None:
        sched.step()
        sparsifier.step()

    _peer_loop(model, loader, cfg["prune_epochs"], cfg["prune_every"], event)
    sparsifier.squash_mask()


def run_global_magnitude(model: nn.Module, level: float, cfg: dict[str, Any],
                         loader: EpochLoader) -> None:
    from torch.nn.utils import prune as tprune

    params = _weights(model)
    total = sum(m.weight.numel() for m, _ in params)
    n_events, state = _events(cfg, loader), {"t": 0, "pruned": 0}

    def event() -> None:
        state["t"] = min(state["t"] + 1, n_events)
        want = round(total * level * (1 - (1 - state["t"] / n_events) ** 3))
        if want > state["pruned"]:
            tprune.global_unstructured(params, tprune.L1Unstructured, amount=want - state["pruned"])
            state["pruned"] = want

    _peer_loop(model, loader, cfg["prune_epochs"], cfg["prune_every"], event)
    for m, name in params:
        if tprune.is_pruned(m):
            tprune.remove(m, name)


def run_dense_control(model: nn.Module, level: float, cfg: dict[str, Any],
                      loader: EpochLoader) -> None:
    """The same extra training without pruning: what the budget alone buys."""
    _peer_loop(model, loader, cfg["prune_epochs"], cfg["prune_every"], lambda: None)


def zero_fraction(model: nn.Module) -> float:
    ws = [m.weight for m, _ in _weights(model)]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def shrink_prunekit(model: nn.Module, ratio: float, example: torch.Tensor, importance: str,
                    global_pruning: bool = False) -> None:
    structured_prune(model, example, ratio=ratio, importance=importance,
                     global_pruning=global_pruning).apply()


def shrink_torch_pruning(model: nn.Module, ratio: float, example: torch.Tensor) -> None:
    import torch_pruning as tp

    pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(
        p=2), pruning_ratio=ratio, ignored_layers=[model.fc2])
    pruner.step()


def finetune_shrunk(model: nn.Module, loader: EpochLoader, epochs: int,
                    teacher: nn.Module | None) -> None:
    """The one fine-tune recipe every structured method gets: Adam, learning rate
    annealed to zero along a cosine over the run, label smoothing (distillation's own loss
    when a teacher is given)."""
    opt = torch.optim.Adam(model.parameters(), lr=FINETUNE_LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
    prunekit.finetune(model, loader, epochs=epochs, optimizer=opt, lr_scheduler=sched,
                      loss_fn=lambda out, y: F.cross_entropy(out, y,
                                                             label_smoothing=LABEL_SMOOTHING),
                      teacher=teacher)


UNSTRUCTURED_METHODS = {
    "prunekit GlobalSparsifier (LAMP)": run_prunekit,
    "torch.ao WeightNorm + CubicSL (Linear only)": run_torch_ao,
    "global magnitude (torch.nn.utils.prune)": run_global_magnitude,
}


def _row(kind: str, level: float, method: str, model: nn.Module, data: dict, start: float,
         pruned_acc: float | None = None, dense_acc: float = math.nan) -> dict[str, Any]:
    acc = accuracy(model, data["x_test"], data["y_test"])
    return {"kind": kind, "level": level, "method": method,
            "acc_after_prune": "" if pruned_acc is None else round(pruned_acc, 2),
            "accuracy": round(acc, 2), "vs_dense": round(acc - dense_acc, 2),
            "std": "", "per_seed": "",
            "weight_zeros": round(zero_fraction(model), 3), "params": params(model),
            "seconds": round(time.perf_counter() - start, 1)}


def _seed_row(ratio: float, method: str, runs: list[dict[str, Any]],
              dense_acc: float) -> dict[str, Any]:
    """One row per method and level: the mean over seeds, their std and every seed."""
    accs = [r["accuracy"] for r in runs]
    mean = statistics.fmean(accs)
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return {"kind": "channels", "level": ratio, "method": method,
            "acc_after_prune": runs[0]["acc_after_prune"], "accuracy": round(mean, 2),
            "vs_dense": round(mean - dense_acc, 2), "std": f"{std:.2f}",
            "per_seed": " / ".join(f"{a:.2f}" for a in accs), "weight_zeros": 0.0,
            "params": runs[0]["params"],
            "seconds": round(sum(r["seconds"] for r in runs) / len(runs), 1)}


def unstructured(dense: nn.Module, cfg: dict, data: dict, dense_acc: float,
                 rows: list[dict], save: Callable[[], None]) -> None:
    loader = EpochLoader(data["x_train"], data["y_train"], cfg["batch"], seed=1)
    start = time.perf_counter()
    control = copy.deepcopy(dense)
    run_dense_control(control, 0.0, cfg, loader)
    rows.append(_row("unstructured", 0.0, "dense + same training (control)", control, data,
                     start, dense_acc=dense_acc))
    for level in UNSTRUCTURED:
        for method, fn in UNSTRUCTURED_METHODS.items():
            start, model = time.perf_counter(), copy.deepcopy(dense)
            loader.passes = 0  # every method sees the same batches
            fn(model, level, cfg, loader)
            rows.append(_row("unstructured", level, method, model, data, start,
                             dense_acc=dense_acc))
            save()


def structured(dense: nn.Module, cfg: dict, data: dict, dense_acc: float,
               rows: list[dict], save: Callable[[], None]) -> None:
    example = data["x_train"][:2]
    methods = {
        "prunekit engine (L2)": lambda m, r: shrink_prunekit(m, r, example, "l2"),
        "Torch-Pruning MagnitudePruner (L2)": lambda m, r: shrink_torch_pruning(m, r, example),
        "prunekit engine (LAMP, global)": lambda m, r: shrink_prunekit(m, r, example, "lamp",
                                                                       True),
        "prunekit engine (L2) + distillation": lambda m, r: shrink_prunekit(m, r, example, "l2"),
    }
    for ratio in CHANNELS:
        for method, shrink in methods.items():
            runs = []
            for seed in cfg["seeds"]:  # the seed picks the fine-tune's batch order
                loader = EpochLoader(data["x_train"], data["y_train"], cfg["batch"], 2 + seed)
                start, model = time.perf_counter(), copy.deepcopy(dense)
                shrink(model, ratio)
                pruned = accuracy(model, data["x_test"], data["y_test"])
                teacher = dense if "distillation" in method else None
                finetune_shrunk(model, loader, cfg["finetune_epochs"], teacher)
                runs.append(_row("channels", ratio, method, model, data, start, pruned,
                                 dense_acc))
                print(method, ratio, seed, runs[-1]["accuracy"], flush=True)
            rows.append(_seed_row(ratio, method, runs, dense_acc))
            save()


def plot(rows: list[dict], dense_acc: float, n_seeds: int, path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind, title in ((axes[0], "unstructured", "unstructured (gradual, CubicSL)"),
                            (axes[1], "channels", f"channels (+ one fine-tune epoch; mean ± std "
                                                  f"over {n_seeds} seeds)")):
        methods = dict.fromkeys(r["method"] for r in rows if r["kind"] == kind and r["level"])
        for method in methods:
            pts = [(r["level"], r["accuracy"], float(r["std"] or 0)) for r in rows
                   if r["kind"] == kind and r["method"] == method]
            levels, accs, stds = zip(*pts, strict=True)
            ax.errorbar(levels, accs, yerr=stds, marker="o", capsize=3, label=method)
        ax.axhline(dense_acc, color="grey", linestyle="--", label="dense")
        ax.set_xlabel("sparsity" if kind == "unstructured" else "fraction of channels removed")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    cfg = QUICK if args.quick else FULL
    name, data = load(args.quick)
    side = data["x_train"].shape[-1]
    dense = CNN(side, cfg["widths"], cfg["hidden"])
    start = time.perf_counter()
    prunekit.finetune(dense, EpochLoader(data["x_train"], data["y_train"], cfg["batch"], 0),
                      epochs=cfg["dense_epochs"], lr=1e-3)
    dense_acc = accuracy(dense, data["x_test"], data["y_test"])
    rows = [{"kind": "dense", "level": 0.0, "method": "dense CNN", "acc_after_prune": "",
             "accuracy": round(dense_acc, 2), "vs_dense": 0.0, "std": "", "per_seed": "",
             "weight_zeros": round(zero_fraction(dense), 3), "params": params(dense),
             "seconds": round(time.perf_counter() - start, 1)}]
    notes = (f"{name}: {len(data['y_train'])} train / {len(data['y_test'])} test images. "
             f"CNN conv{cfg['widths']}+fc{cfg['hidden']}, dense {cfg['dense_epochs']} epochs "
             f"(Adam 1e-3). Unstructured: {cfg['prune_epochs']} epochs SGD(0.01, momentum 0.9, "
             f"wd 1e-4, linear decay), cubic schedule over the first 60% of steps, a prune "
             f"event every {cfg['prune_every']} steps. Channels: prune, then "
             f"{cfg['finetune_epochs']} epoch Adam {FINETUNE_LR:g} with a cosine decay to 0 "
             f"and label smoothing {LABEL_SMOOTHING:g}, the same for every method "
             "(distillation: alpha 0.5, T 4, from the dense model, in place of label "
             f"smoothing), repeated for fine-tune seeds {cfg['seeds']} (batch orders; the "
             "dense model and the pruned channels are the same for every seed): accuracy "
             "is their mean, std their sample standard deviation, per_seed every run. "
             f"vs_dense = accuracy - dense accuracy (points). {args.threads} thread(s).")

    def save() -> None:
        print(rows[-1], flush=True)
        write_results("quality", rows, notes, args.quick)

    save()
    unstructured(dense, cfg, data, dense_acc, rows, save)
    structured(dense, cfg, data, dense_acc, rows, save)
    png = RESULTS / ("quality-quick.png" if args.quick else "quality.png")
    plot(rows, dense_acc, len(cfg["seeds"]), png)


if __name__ == "__main__":
    main()
