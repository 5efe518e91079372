"""One-shot pruning of a mixture-of-experts model, on real weights and real text.

No MoE checkpoint ships offline, so SmolLM2-135M-Instruct is upcycled into a Mixtral:
every block's MLP becomes ``--experts`` identical experts (4 by default) behind a random
top-2 router. The routing weights of a token sum to one, so the dense MoE computes what
SmolLM2 computes (its perplexity is in the notes); pruning then treats each expert as a
layer of its own, calibrated on the tokens routed to it, so the experts part ways.

Part ``oneshot`` (``results/oneshot_moe``): each row prunes SmolLM2 or its MoE twin with
the same method and pattern. Part ``channels`` (``results/oneshot_moe_channels``):
``prune_expert_channels`` narrows the experts of the twin, and of SmolLM2's one-expert
twin (top-1 of one expert: SmolLM2 itself, its MLPs narrowed by the same score). Both
use the same calibration sequences (``--calib``, 32 by default, cut from 90% of the
Wikipedia summaries) and the same held-out 10%. ``--quick`` upcycles a tiny random Llama
(a smoke test). Run: ``python -m benchmarks.oneshot_moe [--quick] [--part oneshot|channels]
[--jobs 2 --threads 1]``.
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
    and embeddings, each MLP copied into ``experts`` experts, a random top-2 router
    (top-1 for a single expert)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    source = llama.config.to_dict()
    for key in ("architectures", "model_type", "transformers_version", "mlp_bias"):
        source.pop(key, None)
    config = MixtralConfig(**source, num_local_experts=experts,
                           num_experts_per_tok=min(2, experts))
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


CHANNEL_RUNS = [(kind, keep, score) for keep in (0.75, 0.5) for kind in ("SmolLM2", "MoE")
                for score in ("activation", "wanda")]


def narrow(run: tuple[str, float, str], quick: bool, threads: int, calib_seqs: int,
           experts: int, dense: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    """``prune_expert_channels`` on the twin (or the one-expert twin): perplexity, time."""
    torch.set_num_threads(threads)
    kind, keep, score = run
    model, calib, held_out = _setup(quick, calib_seqs)
    twin = upcycle(model, experts if kind == "MoE" else 1)
    start = time.perf_counter()
    prunekit.prune_expert_channels(twin, calib, keep=keep, score=score)
    seconds = time.perf_counter() - start
    ppl = perplexity(twin, held_out)
    bank = twin.model.layers[0].mlp.experts
    row = {"model": kind, "experts": bank.down_proj.shape[0], "width kept": f"{keep:.0%}",
           "score": score, "expert width": bank.down_proj.shape[2], "perplexity": ppl,
           "x dense": ppl / dense["SmolLM2"], "prune s": seconds}
    print(row, flush=True)
    return row


def _run_all(fn: Any, runs: list[Any], args: Any, calib_seqs: int, experts: int,
             dense: dict[str, float]) -> list[dict[str, Any]]:  # fmt: skip
    if args.jobs <= 1:
        return [fn(r, args.quick, args.threads, calib_seqs, experts, dense) for r in runs]
    n = len(runs)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(fn, runs, [args.quick] * n, [args.threads] * n,
                             [calib_seqs] * n, [experts] * n, [dense] * n))


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], extra=[
        ("--calib", "calibration sequences (default 32)"),
        ("--experts", "experts per block (default 4)"),
        ("--part", "oneshot or channels (default: both)")])
    calib_seqs, experts = int(args.calib or 32), int(args.experts or 4)
    parts = [args.part] if args.part else ["oneshot", "channels"]
    model, calib, held_out = _setup(args.quick, calib_seqs)
    dense = {"SmolLM2": perplexity(model, held_out),
             "MoE": perplexity(upcycle(model, experts), held_out)}
    what = ("a tiny random Llama, random tokens (smoke test)" if args.quick
            else "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to float32)")
    notes = (f"{what} and its MoE twin ({experts} copies of each MLP, random top-2 router); "
             f"dense perplexity {dense['SmolLM2']:.3f}, MoE twin {dense['MoE']:.3f}; "
             f"calibration {len(calib)} sequences, {args.jobs} process(es) side by side, "
             f"{args.threads} thread(s) each.")
    for part in parts:
        if part == "oneshot":
            rows = _run_all(measure, RUNS, args, calib_seqs, experts, dense)
            path = write_results("oneshot_moe", rows, notes=notes, quick=args.quick)
        elif part == "channels":
            rows = _run_all(narrow, CHANNEL_RUNS, args, calib_seqs, experts, dense)
            path = write_results("oneshot_moe_channels", rows, quick=args.quick, notes=(
                f"{notes} SmolLM2 rows: its one-expert twin (top-1 of 1: SmolLM2 itself), "
                "narrowed by the same score; x dense is against SmolLM2 dense."))
        else:
            raise SystemExit(f"--part: expected oneshot or channels, got {part!r}")
        print(path.read_text())


if __name__ == "__main__":
    main()
