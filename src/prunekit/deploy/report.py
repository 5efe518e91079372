"""What ``to_sparse`` chose for each layer and why (attached as ``model.deploy_report``)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DeployReport", "LayerChoice"]


@dataclass
class LayerChoice:
    """One layer's decision: the layout kept, why, and the timings it was based on."""

    fqn: str
    module_type: str
    shape: tuple[int, int]
    sparsity: float
    layout: str
    reason: str
    times_ms: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # layouts that did not fit, and why


@dataclass
class DeployReport:
    """Per-layer choices, printable as a table."""

    layers: list[LayerChoice] = field(default_factory=list)
    model: str = ""  # what auto's model round measured and kept, if it ran

    def __getitem__(self, fqn: str) -> LayerChoice:
        for layer in self.layers:
            if layer.fqn == fqn:
                return layer
        known = [x.fqn for x in self.layers]
        raise KeyError(f"no layer {fqn!r} in the deploy report; it has {known}")

    def __len__(self) -> int:
        return len(self.layers)

    def chosen(self) -> dict[str, str]:
        """``{fqn: layout}`` for every layer considered."""
        return {layer.fqn: layer.layout for layer in self.layers}

    def __str__(self) -> str:
        lines = ["| layer | type | shape | sparsity | layout | why |", "|---|---|---|---|---|---|"]
        for x in self.layers:
            lines.append(
                f"| {x.fqn} | {x.module_type} | {x.shape[0]}x{x.shape[1]} | {x.sparsity:.2f} "
                f"| {x.layout} | {x.reason} |"
            )
        return "\n".join(lines + ([f"\n{self.model}"] if self.model else []))
