"""Resume a checkpointed pruning schedule in a fresh process.

``python -m tests.trust._resume_worker CHECKPOINT START OUT`` rebuilds the model,
optimizer, sparsifier and scheduler exactly as the first process did, loads their
state_dicts from ``CHECKPOINT`` (``weights_only=True``), trains batches ``START:`` and
saves the final masks and weights to ``OUT``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from tests.trust._helpers import batches, make_scheduler, make_sparsifier, masks_of, tiny_model

STEPS = 8


def build(scheduler: Callable[[Any], Any] = make_scheduler) -> dict[str, Any]:
    """Everything a run needs, in the order a resume must follow: prepare the model,
    build optimizer and scheduler, and only then load state_dicts into them."""
    torch.set_num_threads(1)  # the same reduction order in both processes
    model = tiny_model(torch.float32)
    sparsifier = make_sparsifier(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    parts = {"model": model, "optimizer": optimizer, "sparsifier": sparsifier}
    return {**parts, "scheduler": scheduler(sparsifier)}


def run(parts: dict[str, Any], start: int, stop: int) -> None:
    """Train on batches ``start:stop`` of the fixed sequence."""
    model, optimizer = parts["model"], parts["optimizer"]
    for x, y in batches(STEPS, torch.float32)[start:stop]:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        parts["sparsifier"].step()
        parts["scheduler"].step()


def checkpoint(parts: dict[str, Any]) -> dict[str, Any]:
    """The four state_dicts, as a training script would save them."""
    return {name: part.state_dict() for name, part in parts.items()}


def result(parts: dict[str, Any]) -> dict[str, Any]:
    weights = {k: v.detach().clone() for k, v in parts["model"].state_dict().items()}
    return {"masks": masks_of(parts["sparsifier"]), "weights": weights}


def main(path: str, start: int, out: str) -> None:
    saved = torch.load(path, weights_only=True)
    parts = build()
    for name, part in parts.items():
        part.load_state_dict(saved[name])
    run(parts, start, STEPS)
    torch.save(result(parts), out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
