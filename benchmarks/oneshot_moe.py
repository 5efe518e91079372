"""One-shot pruning of a mixture-of-experts model, on real weights and real text.

No MoE checkpoint ships offline, so SmolLM2-135M-Instruct is upcycled into a Mixtral:
every block's MLP becomes ``--experts`` identical experts (4 by default) behind a random
top-2 router. The routing weights of a token sum to one, so the dense MoE computes what
SmolLM2 computes (its perplexity is in the notes); pruning then treats each expert as a
layer of its own, calibrated on the tokens routed to it, so the experts part ways. Each
row prunes SmolLM2 or its MoE twin with the same method, pattern and calibration
sequences (``--calib``, 32 by default, cut from 90% of the Wikipedia summaries) and
scores it on the same held-out 10%. ``--quick`` upcycles a tiny random Llama (a smoke
test). Run: ``python -m benchmarks.oneshot_moe [--quick] [--jobs 2 --threads 1]``.
"""

from __future__ import annotations

import copy
import multiprocessing
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch
from torch import nn

import prunekit
from benchmarks._common import parse_args, write_results
from benchmarks.oneshot import _setup
from prunekit.oneshot.data import perplexity

Run = tuple[str, str, str | None]  # model ("SmolLM2" or "MoE"), method, pattern
RUNS: list[Run] = [(kind, method, pattern) for pattern in (None, "2:4")
                   for method in ("wanda", "sparsegpt") for kind in ("SmolLM2", "MoE")]


def upcycle(llama: nn.Module, experts: int, seed: int = 0) -> nn.Module:
    """A ``MixtralForCausalLM`` computing what ``llama`` computes: its attention, norms
    and embeddings, each MLP copied into ``experts`` experts, a random top-2 router."""
    from transformers import MixtralConfig, MixtralForCausalLM

    source = llama.config.to_dict()
    for key in ("architectures", "model_type", "transformers_version", "mlp_bias"):
        source.pop(key, None)
    config = MixtralConfig(**source, num_local_experts=experts, num_experts_per_tok=2)
    moe = MixtralForCausalLM(config).eval()
    state = {}
    for name, tensor in llama.state_dict().items():
        mlp = name.rsplit(".mlp.", 1)
        if len(mlp) == 1:
            state[name] = tensor
            continue
        prefix, kind = f"{mlp[0]}.mlp.experts.", mlp[1].removesuffix("_proj.weight")
        if kind == "down":
            state[f"{prefix}down_proj"] = tensor.expand(experts, *tensor.shape)
        else:  # gate, then up: the halves transformers' chunk(2) takes
            state.setdefault(f"{prefix}gate_up", {})[kind] = tensor
    for key in [k for k in state if k.endswith("gate_up")]:
        parts = state.pop(key)
        fused = torch.cat([parts["gate"], parts["up"]])
        state[f"{key}_proj"] = fused.expand(experts, *fused.shape)
    generator = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(moe.model.layers):
        router = torch.randn(layer.mlp.gate.weight.shape, generator=generator)
        state[f"model.layers.{i}.mlp.gate.weight"] = router * config.initializer_range
    missing, unexpected = moe.load_state_dict(state, strict=False)
    if set(missing) - {"lm_head.weight"} or unexpected:
        raise RuntimeError(f"upcycle: missing {missing}, unexpected {unexpected}")
    return moe.eval()


def measure(run: Run, quick: bool, threads: int, calib_seqs: int, experts: int,
            dense: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    torch.set_num_threads(threads)
    kind, method, pattern = run
    model, calib, held_out = _setup(quick, calib_seqs)
    pruned = upcycle(model, experts) if kind == "MoE" else copy.deepcopy(model)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        achieved = prunekit.oneshot(pruned, calib, method, pattern=pattern, progress=False)
    seconds = time.perf_counter() - start
    unreached = sum("no calibration token reached" in str(w.message) for w in caught)
    ppl = perplexity(pruned, held_out)
    row = {"model": kind, "method": method, "sparsity": pattern or "50%",
           "layers pruned": len(achieved), "perplexity": ppl, "x dense": ppl / dense[kind],
           "prune s": seconds, "unreached warning": bool(unreached)}
    print(row, flush=True)
    return row


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], extra=[
        ("--calib", "calibration sequences (default 32)"),
        ("--experts", "experts per block (default 4)")])
    calib_seqs, experts = int(args.calib or 32), int(args.experts or 4)
    model, calib, held_out = _setup(args.quick, calib_seqs)
    dense = {"SmolLM2": perplexity(model, held_out),
             "MoE": perplexity(upcycle(model, experts), held_out)}
    runs = RUNS
    if args.jobs <= 1:
        rows = [measure(r, args.quick, args.threads, calib_seqs, experts, dense) for r in runs]
    else:
        context = multiprocessing.get_context("spawn")
        n = len(runs)
        with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            rows = list(pool.map(measure, runs, [args.quick] * n, [args.threads] * n,
                                 [calib_seqs] * n, [experts] * n, [dense] * n))
    what = ("a tiny random Llama, random tokens (smoke test)" if args.quick
            else "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to float32)")
    notes = (f"{what} and its MoE twin ({experts} copies of each MLP, random top-2 router); "
             f"dense perplexity {dense['SmolLM2']:.3f}, MoE twin {dense['MoE']:.3f}; "
             f"calibration {len(calib)} sequences, {args.jobs} process(es) side by side, "
             f"{args.threads} thread(s) each.")
    path = write_results("oneshot_moe", rows, notes=notes, quick=args.quick)
    print(path.read_text())


if __name__ == "__main__":
    main()
