"""The ``prunekit`` command."""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    """Gradual 2-layer pruning with CubicSL on a small MLP, printing sparsity per layer."""
    import prunekit

    torch.manual_seed(args.seed)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    sparsifier = prunekit.WeightNormSparsifier(sparsity_level=0.9, sparse_block_shape=(1, 1))
    sparsifier.prepare(model, config=None)
    scheduler = prunekit.CubicSL(sparsifier, init_sl=0.0, delta_t=1, total_t=5)
    for epoch in range(6):
        sparsifier.step()
        levels = ", ".join(
            f"{g['tensor_fqn']}={g['sparsity_level']:.2f}" for g in sparsifier.groups
        )
        print(f"epoch {epoch}: target {levels}")
        scheduler.step()
    sparsifier.squash_mask()
    print(f"{'layer':<12}{'shape':<14}{'sparsity':>9}")
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            zeros = float((module.weight == 0).float().mean())
            print(f"{name:<12}{tuple(module.weight.shape)!s:<14}{zeros:>9.1%}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prunekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the end-to-end example on its bundled default")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
