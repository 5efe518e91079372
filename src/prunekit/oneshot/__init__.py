"""One-shot pruning of pretrained models from calibration data.

``prunekit.oneshot(model, batches, method=...)`` is the one-call entry point (the name
``prunekit.oneshot`` is that function; import the helpers of this package with
``from prunekit.oneshot.<module> import ...``). ``blocks`` finds the stack of blocks
to prune one after another, ``engine`` runs them (mixture-of-experts banks unfused by
``prunekit.experts``), ``expert_drop`` removes whole experts (``prunekit.drop_experts``),
``expert_channels`` narrows them (``prunekit.prune_expert_channels``), ``owl`` spreads
sparsity among blocks by their outlier weights (``prunekit.owl_sparsity``), ``offload``
keeps the calibration hidden states on disk (``offload_folder``), ``data`` loads the
real model and text used by the benchmark and the slow tests.
"""

from prunekit.oneshot.api import METHODS, oneshot
from prunekit.oneshot.blocks import find_decoder_stack
from prunekit.oneshot.expert_channels import prune_expert_channels
from prunekit.oneshot.expert_drop import drop_experts
from prunekit.oneshot.owl import owl_sparsity

__all__ = ["METHODS", "drop_experts", "find_decoder_stack", "oneshot", "owl_sparsity",
           "prune_expert_channels"]
