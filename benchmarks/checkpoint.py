"""Pickle-free checkpoints vs torch's own ways of saving a pruned model.

prunekit.save/load (safetensors + JSON structure, replayed onto a freshly built model)
against ``torch.save(model)`` + ``torch.load(weights_only=False)`` (pickles the whole
module: the only torch-native way to get a channel-pruned model back) and
``torch.save(state_dict)`` + ``torch.load(weights_only=True)`` into a fresh model (safe,
but fails for a shrunk model). Times are save + load round trips, medians, interleaved.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import prunekit
from benchmarks._common import interleaved, parse_args, ratio, write_results
from prunekit.tool import DigitsCNN
from prunekit.tool.stages import structured_stage


def _wide_cnn(width: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width),
                                   nn.ReLU()]
        for _ in range(6):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 100)]
        return nn.Sequential(*layers)

    return build


def _cases(quick: bool) -> list[tuple[str, Callable[[], nn.Module], torch.Tensor]]:
    width = 32 if quick else 256
    return [("digits CNN", DigitsCNN, torch.randn(1, 1, 8, 8)),
            (f"7-conv CNN, width {width}", _wide_cnn(width), torch.randn(1, 3, 16, 16))]


def _state_dict_round_trip(model: nn.Module, factory: Callable[[], nn.Module],
                           folder: Path) -> bool:
    torch.save(model.state_dict(), folder / "sd.pt")
    try:
        factory().load_state_dict(torch.load(folder / "sd.pt", weights_only=True))
    except RuntimeError:
        return False
    return True


def _measure(label: str, factory: Callable[[], nn.Module], model: nn.Module, x: torch.Tensor,
             repeats: int, folder: Path) -> dict:
    ours, pickled = folder / "ours", folder / "model.pt"

    def prunekit_round_trip() -> None:
        prunekit.save(model, ours, overwrite=True)
        prunekit.load(factory, ours)

    def pickle_round_trip() -> None:
        torch.save(model, pickled)
        torch.load(pickled, weights_only=False)

    times = interleaved({"prunekit": prunekit_round_trip, "pickle": pickle_round_trip}, repeats)
    loaded = prunekit.load(factory, ours).eval()
    with torch.no_grad():
        identical = torch.equal(loaded(x), model.eval()(x))
    size = sum(p.stat().st_size for p in ours.iterdir())
    return {"model": label, "prunekit s": times["prunekit"], "torch.save(model) s": times["pickle"],
            "pickle / prunekit": ratio(times["pickle"], times["prunekit"]),
            "prunekit bytes": size, "pickle bytes": pickled.stat().st_size,
            "bit-identical": identical,
            "state_dict + weights_only works": _state_dict_round_trip(model, factory, folder)}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, factory, x in _cases(args.quick):
            torch.manual_seed(args.seed)
            dense = factory().eval()
            rows.append(_measure(f"{label}, dense", factory, dense, x, args.repeats, Path(tmp)))
            slim = factory().eval()
            structured_stage(slim, (x,), 0.5)
            rows.append(_measure(f"{label}, 50 % channels", factory, slim, x, args.repeats,
                                 Path(tmp)))
    notes = ("Round trip = save + load (prunekit: build the model, replay the recorded plan, "
             "load safetensors; torch.save(model): pickle the whole module). Ratio > 1: "
             "prunekit is faster. The pickle peer needs weights_only=False, i.e. runs "
             "arbitrary code from the file; state_dict + weights_only=True cannot restore a "
             "shrunk model.")
    print(write_results("checkpoint", rows, notes, quick=args.quick).read_text())


if __name__ == "__main__":
    main()
