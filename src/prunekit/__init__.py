"""prunekit: make PyTorch models sparse, smaller and faster.

Every name of ``torch.ao.pruning`` is exported here with the same signature, so code
written for the reference runs after changing only its import.
"""

from prunekit.accuracy import (
    GlobalSparsifier,
    SensitivityTable,
    allocate,
    finetune,
    gradual_prune,
    keep_masks,
    sensitivity_scan,
)
from prunekit.errors import (
    ConfigError,
    ConfigTypeError,
    FqnError,
    PruneKitError,
    StateDictError,
    StateError,
    UnsupportedError,
)
from prunekit.fqn import fqn_to_module, get_arg_info_from_tensor_fqn, module_to_fqn
from prunekit.mappings import (
    get_dynamic_sparse_quantized_mapping,
    get_static_sparse_quantized_mapping,
)
from prunekit.oneshot import drop_experts, oneshot, owl_sparsity, prune_expert_channels
from prunekit.parametrization import FakeSparsity, module_contains_param
from prunekit.scheduler import BaseScheduler, CubicSL, LambdaSL
from prunekit.sparsifier import (
    AdmmSparsifier,
    BaseSparsifier,
    NearlyDiagonalSparsifier,
    SparseGPTSparsifier,
    WandaSparsifier,
    WeightNormSparsifier,
)
from prunekit.swap import swap_module
from prunekit.tool.checkpoint import load, save

__version__ = "0.1.0"

__all__ = [
    "AdmmSparsifier",
    "BaseScheduler",
    "BaseSparsifier",
    "ConfigError",
    "ConfigTypeError",
    "CubicSL",
    "FakeSparsity",
    "FqnError",
    "GlobalSparsifier",
    "LambdaSL",
    "NearlyDiagonalSparsifier",
    "PruneKitError",
    "SensitivityTable",
    "SparseGPTSparsifier",
    "StateDictError",
    "StateError",
    "UnsupportedError",
    "WandaSparsifier",
    "WeightNormSparsifier",
    "allocate",
    "drop_experts",
    "finetune",
    "fqn_to_module",
    "get_arg_info_from_tensor_fqn",
    "get_dynamic_sparse_quantized_mapping",
    "get_static_sparse_quantized_mapping",
    "gradual_prune",
    "keep_masks",
    "load",
    "module_contains_param",
    "module_to_fqn",
    "oneshot",
    "owl_sparsity",
    "prune_expert_channels",
    "save",
    "sensitivity_scan",
    "swap_module",
]
