"""GPU benchmark of specmesh: real gRPC services on one GPU, random weights of real shapes.

    python3 scripts/gpu_bench.py [--out DIR] [--levels 1,16,64] [--alphas 0.6,0.8,0.9]
    python3 scripts/gpu_bench.py --tiny          # the same flow on CPU with tiny models (a check)

One command, sized for one 10-minute device call. It:
1. builds a Llama-3-8B-shaped verifier and a small Llama-shaped drafter (random weights, bf16;
   no weights exist on the device, and no tokenizer is needed: token ids are synthetic);
2. starts the verifier and drafter services and, per alpha, a scheduler (its own calibration),
   all in this process, over gRPC on loopback, driven through the scheduler's Generate API
   (the gateway only adds text handling, which synthetic token ids do not have);
3. measures the verifier's cost curve (ms per forward vs batch tokens; CUDA graphs vs eager vs
   the old padded layout) and the drafter's step cost, and HF `generate` as a plain baseline;
4. per concurrency level: speculation off (whose greedy outputs become the references), then
   CONTROLLED ACCEPTANCE (drafter/controlled_acceptance.py: real drafter forwards, proposing the
   verifier's reference continuation with each token corrupted with probability 1 - alpha) for
   each alpha, interleaved, repeated; with the scheduler's adaptive policy choosing gamma;
5. writes everything to DIR/gpu_bench.json and prints a short table last, with the analytic
   ceiling (1 - a^(g+1)) / ((1 - a)(g c + 1)) for the measured a, g and cost ratio c.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from drafter.config import DrafterConfig  # noqa: E402
from drafter.controlled_acceptance import ControlledAcceptanceDrafter  # noqa: E402
from drafter.server import start_drafter  # noqa: E402
from scheduler.round_timing import load_bucket  # noqa: E402
from specmesh import fused_ops  # noqa: E402
from specmesh.distributions import greedy_drafts  # noqa: E402
from specmesh.model_runner import ForwardRequest, ModelRunner  # noqa: E402
from verifier.config import VerifierConfig  # noqa: E402
from verifier.server import start_verifier  # noqa: E402

from bench_processes import ClientHost, SchedulerHost  # noqa: E402

log = logging.getLogger("gpu_bench")

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False)
# Llama-3.2-1B width and vocabulary, 8 layers instead of 16: 0.75B parameters, plus an untied
# LM head (the same cost as a tied one; untied so the drafter can be made to agree with the
# verifier, see make_decisive: a tied head would overwrite the input embedding).
DRAFTER = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=8, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False)
TINY_VERIFIER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=False)
TINY_DRAFTER = dict(TINY_VERIFIER, num_hidden_layers=1)


def build_model(shape: dict, seed: int, device: str, dtype: torch.dtype, *, decisive: bool = False,
                permutation: torch.Tensor | None = None) -> torch.nn.Module:
    """Random weights of a real shape. decisive: weights whose greedy continuation survives
    low-precision kernel differences (see make_decisive); permutation: the one to follow (a
    drafter agreeing with a decisive verifier), else a random one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**shape))
    finally:
        torch.set_default_dtype(previous)
    if decisive:
        model.permutation = make_decisive(model, seed, permutation)
    return model.eval()


@torch.no_grad()
def make_decisive(model: torch.nn.Module, seed: int, permutation: torch.Tensor | None = None) -> torch.Tensor:
    """A random model's next-token distribution is nearly flat: top-1 and top-2 logits sit within
    bf16 rounding of each other so often that two equivalent batchings disagree on the argmax
    (5.6% of tokens on the first GPU runs), and a reference continuation computed in one batching
    is not what another verifies. Here the residual stream is dominated by the input token's
    embedding (decoder layers at a tenth of the usual init scale) and the LM head is a
    permutation of the embedding, so the argmax wins by a wide margin: greedy decoding follows
    a fixed random permutation of the vocabulary, identically in any batching. Shapes, and so
    every cost, are those of the real model. A drafter made decisive with the verifier's
    permutation agrees with it on every greedy token (used for HF assisted generation, whose
    assistant cannot be told what to propose). Returns the permutation."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    embedding = model.get_input_embeddings().weight
    embedding.copy_(torch.randn(embedding.shape, generator=generator).to(embedding))
    for name, parameter in model.named_parameters():
        if ".layers." in name and parameter.dim() == 2:
            parameter.mul_(0.1)
    if permutation is None:
        permutation = torch.randperm(embedding.shape[0], generator=generator)
    permutation = permutation.to(embedding.device)
    model.get_output_embeddings().weight.copy_(embedding[permutation])
    return permutation


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- cost curves (run on the service's own worker thread, between requests) -----------------
def time_forwards(runner: ModelRunner, sessions: int, q: int, *, context: int, reps: int,
                  drafter_top_k: int | None = None) -> float:
    """Median ms of one forward of `q` tokens for each of `sessions` sessions holding `context`
    tokens, including the device-to-host transfer the caller needs (argmax for a verifier, the
    greedy top-k for a drafter)."""
    cache, vocab = runner.cache, runner.vocab_size
    slots = [cache.allocate() for _ in range(sessions)]
    try:
        rng = random.Random(sessions * 1000 + q)
        runner.forward_flat([ForwardRequest(s, [rng.randrange(vocab) for _ in range(context)], context - 1)
                             for s in slots])
        step = [ForwardRequest(s, [rng.randrange(vocab) for _ in range(q)], 0) for s in slots]
        times = []
        for attempt in range(reps + 2):
            sync(runner.device)
            start = time.perf_counter()
            logits, _ = runner.forward_flat(step)
            if drafter_top_k is None:
                logits.argmax(dim=-1).tolist()
            else:
                greedy_drafts(logits)
            elapsed = time.perf_counter() - start
            for s in slots:
                cache.truncate(s, context)
            if attempt >= 2:
                times.append(elapsed)
        return 1000 * statistics.median(times)
    finally:
        for s in slots:
            cache.free(s)


def cost_curves(runner: ModelRunner, shapes: list[tuple[int, int]], eager_shapes: list[tuple[int, int]], *,
                context: int, reps: int, drafter_top_k: int | None = None) -> list[dict]:
    rows = []
    graphs = runner.packed.graphs if runner.packed is not None else None
    for sessions, q in shapes:
        row = {"sessions": sessions, "tokens_per_session": q, "batch_tokens": sessions * q,
               "ms": time_forwards(runner, sessions, q, context=context, reps=reps, drafter_top_k=drafter_top_k)}
        if (sessions, q) in eager_shapes and graphs is not None:
            runner.packed.graphs = None
            try:
                row["ms_eager"] = time_forwards(runner, sessions, q, context=context, reps=reps,
                                                drafter_top_k=drafter_top_k)
            finally:
                runner.packed.graphs = graphs
        rows.append(row)
        log.info("cost %s", row)
    return rows


def padded_cost(model: torch.nn.Module, shapes: list[tuple[int, int]], *, slots: int, max_context: int,
                context: int, reps: int) -> list[dict]:
    """The runner before this work: padded [B, Q] layout, K/V gathered, HF attention, eager."""
    runner = ModelRunner(model, slots, max_context, packed=False)
    try:
        return [{"sessions": s, "tokens_per_session": q, "batch_tokens": s * q,
                 "ms": time_forwards(runner, s, q, context=context, reps=reps)} for s, q in shapes]
    finally:
        del runner


def _timed_generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, device: torch.device,
                    **extra) -> tuple[torch.Tensor, float]:
    """A short warm-up, then one timed greedy HF `generate` of new_tokens tokens (no EOS stops it;
    no min_new_tokens either: HF hands generation arguments on to an assistant's own generate,
    where a minimum length would defeat drafting)."""
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None, **extra)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, **kwargs)
        sync(device)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, **kwargs)
        sync(device)
    return out, time.perf_counter() - start


def hf_generate(model: torch.nn.Module, batch: int, new_tokens: int, prompt_length: int, device: torch.device) -> dict:
    """Plain HF transformers `generate` (greedy), the baseline a user would run: ms per step."""
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_length), device=device)
    out, seconds = _timed_generate(model, ids, new_tokens, device)
    generated = out.shape[1] - prompt_length
    return {"batch": batch, "new_tokens": generated, "ms_per_step": 1000 * seconds / generated,
            "aggregate_tokens_per_s": batch * generated / seconds}


def hf_assisted(model: torch.nn.Module, assistant: torch.nn.Module, new_tokens: int, prompt_length: int,
                device: torch.device, seed: int = 0) -> dict:
    """HF transformers assisted generation (`assistant_model=`, greedy, batch 1: it supports no
    batches), with its default assistant settings: tokens per second, and whether its output
    equals plain greedy `generate`."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_length), generator=generator).to(device)
    plain, _ = _timed_generate(model, ids, new_tokens, device)
    out, seconds = _timed_generate(model, ids, new_tokens, device, assistant_model=assistant)
    generated = out.shape[1] - prompt_length
    with torch.inference_mode():  # how often the assistant's own greedy choice is the verifier's
        logits = assistant(plain[:, :-1]).logits[0, prompt_length - 1:]
    agreement = (logits.argmax(dim=-1) == plain[0, prompt_length:]).float().mean().item()
    config = assistant.generation_config
    return {"batch": 1, "new_tokens": generated, "tokens_per_s": generated / seconds,
            "ms_per_token": 1000 * seconds / generated, "equals_plain_greedy": bool(torch.equal(out, plain)),
            "assistant_greedy_agreement": agreement,
            "num_assistant_tokens": getattr(config, "num_assistant_tokens", None),
            "num_assistant_tokens_schedule": getattr(config, "num_assistant_tokens_schedule", None)}


# ---- correctness on the device -------------------------------------------------------------------
def check_runner(model: torch.nn.Module, reference, *, sessions: int, context: int, steps: int, q: int) -> dict:
    """Feed the same sessions through the runner (packed; graphs where they apply) and through
    `reference(tokens) -> logits of the last q tokens`; compare every step's logits."""
    runner = ModelRunner(model, sessions + 1, context + steps * q + 8)
    vocab = runner.vocab_size
    rng = random.Random(5)
    seqs = [[rng.randrange(vocab) for _ in range(context + steps * q)] for _ in range(sessions)]
    slots = [runner.cache.allocate() for _ in range(sessions)]
    runner.forward_flat([ForwardRequest(s, seq[:context], context - 1) for s, seq in zip(slots, seqs)])
    worst, agree, total = 0.0, 0, 0
    for step in range(steps):
        start = context + step * q
        logits = runner.forward([ForwardRequest(s, seq[start:start + q]) for s, seq in zip(slots, seqs)])
        for seq, got in zip(seqs, logits):
            want = reference(seq[:start + q]).to(got.device)
            worst = max(worst, ((got - want).norm() / want.norm()).item())
            agree += int((got.argmax(-1) == want.argmax(-1)).sum().item())
            total += q
    graphs = runner.packed.graphs if runner.packed is not None else None
    return {"relative_error_max": worst, "argmax_agreement": agree / total,
            "graph_forwards": runner.packed.num_graph_forwards if runner.packed else 0, "graphs": len(graphs or ())}


def runner_reference(runner: ModelRunner):
    """Logits of the last 4 tokens of a sequence, prefilled fresh in a slot of `runner`."""
    def run(tokens):
        slot = runner.cache.allocate()
        try:
            return runner.forward([ForwardRequest(slot, tokens, len(tokens) - 4)])[0]
        finally:
            runner.cache.free(slot)
    return run


def device_checks(verifier_model: torch.nn.Module, device: torch.device) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    tiny = LlamaForCausalLM(LlamaConfig(**dict(TINY_VERIFIER, vocab_size=256))).to(device).eval()

    def full(model):
        def run(tokens):
            with torch.inference_mode():
                ids = torch.tensor([tokens], device=device)
                return model(ids, attention_mask=torch.ones_like(ids)).logits[0, -4:].float()
        return run

    out = {"tiny_float32_vs_full_forward": check_runner(tiny, full(tiny), sessions=3, context=20, steps=4, q=4)}
    # The 8B in bf16: runner (packed, graphs) against the old padded layout run eagerly.
    out["verifier_bf16_vs_padded_layout"] = check_runner(
        verifier_model, runner_reference(ModelRunner(verifier_model, 2, 128, packed=False)),
        sessions=3, context=48, steps=3, q=4)
    if device.type == "cuda":  # the same layout without graphs: isolates what capture changes
        out["verifier_bf16_graphs_vs_eager_packed"] = check_runner(
            verifier_model, runner_reference(ModelRunner(verifier_model, 2, 128, cuda_graphs=False)),
            sessions=3, context=48, steps=3, q=4)
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    log.info("device checks: %s", out)
    return out


# ---- load through the services -----------------------------------------------------------------
class BusyClock:
    """Wraps a core method to add up the seconds it runs (on the service's worker thread)."""

    def __init__(self, obj, name: str) -> None:
        self.seconds = 0.0
        self.calls = 0
        original = getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        setattr(obj, name, timed)

    def take(self) -> tuple[float, int]:
        out = (self.seconds, self.calls)
        self.seconds, self.calls = 0.0, 0
        return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarise(samples: list[dict], wall_s: float, verify: tuple[float, int], draft: tuple[float, int]) -> dict:
    tokens = sum(len(s["tokens"]) for s in samples)
    drafted, accepted, rounds = (sum(s[k] for s in samples) for k in ("drafted", "accepted", "rounds"))
    tpot = [(s["latency_s"] - s["ttft_s"]) / (len(s["tokens"]) - 1) for s in samples if len(s["tokens"]) > 1]
    return {
        "requests": len(samples), "completion_tokens": tokens, "wall_s": wall_s,
        "aggregate_tokens_per_s": tokens / wall_s if wall_s else 0.0,
        "per_user_tokens_per_s": statistics.mean(len(s["tokens"]) / s["latency_s"] for s in samples),
        "ttft_p50_ms": 1000 * percentile([s["ttft_s"] for s in samples], 0.5),
        "tpot_p50_ms": 1000 * percentile(tpot, 0.5), "tpot_p99_ms": 1000 * percentile(tpot, 0.99),
        "drafted": drafted, "accepted": accepted, "rounds": rounds,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "tau": (accepted + rounds) / rounds if rounds else 0.0,
        "gamma": drafted / rounds if rounds else 0.0,
        "verifier_busy_s": verify[0], "verify_forwards": verify[1],
        "drafter_busy_s": draft[0], "draft_calls": draft[1],
    }


def ceiling(alpha: float, gamma: float, c: float) -> float:
    """Leviathan et al. 2023: expected speedup for acceptance alpha, draft length gamma, cost ratio c."""
    if gamma <= 0:
        return 1.0
    if alpha >= 1.0:
        return (gamma + 1) / (gamma * c + 1)
    return (1 - alpha ** (gamma + 1)) / ((1 - alpha) * (gamma * c + 1))


async def main_async(args) -> dict:
    started = time.perf_counter()
    tiny = args.tiny
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(), "args": vars(args),
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu"}
    import transformers

    meta["transformers"] = transformers.__version__
    result: dict = {"meta": meta}
    t0 = time.perf_counter()
    verifier_model = build_model(TINY_VERIFIER if tiny else LLAMA3_8B, 0, str(device), dtype, decisive=True)
    # The drafter agrees with the verifier (same permutation): HF assisted generation can use it
    # as its assistant; the services' controlled-acceptance drafter overrides its proposals.
    # --drafter-device cuda:1: the drafter on a GPU of its own, as deployed (two GPUs, one process).
    drafter_device = torch.device(args.drafter_device) if args.drafter_device else device
    meta["drafter_device"] = str(drafter_device)
    drafter_model = build_model(TINY_DRAFTER if tiny else DRAFTER, 1, str(drafter_device), dtype, decisive=True,
                                permutation=verifier_model.permutation.to(drafter_device))
    # The services' drafter: the same weights with a draft vocabulary (FR-Spec / EAGLE-3: an LM
    # head over the K most frequent tokens; what `specmesh train-drafter` ships), or the same
    # model when --draft-vocab is 0. Its proposals come from controlled acceptance either way;
    # the head changes what a draft step costs.
    service_drafter_model = drafter_model
    if args.draft_vocab > 0:
        from specmesh.drafter_training.model import restrict_vocabulary

        service_drafter_model = build_model(TINY_DRAFTER if tiny else DRAFTER, 1, str(drafter_device), dtype,
                                            decisive=True, permutation=drafter_model.permutation)
        vocab = service_drafter_model.config.vocab_size
        restrict_vocabulary(service_drafter_model, list(range(min(args.draft_vocab, vocab // 2 if tiny else vocab))))
    meta["verifier_params_b"] = sum(p.numel() for p in verifier_model.parameters()) / 1e9
    meta["drafter_params_b"] = sum(p.numel() for p in drafter_model.parameters()) / 1e9
    meta["service_drafter_params_b"] = sum(p.numel() for p in service_drafter_model.parameters()) / 1e9
    sync(device)
    meta["build_s"] = time.perf_counter() - t0
    log.info("models built in %.1f s: verifier %.2fB, drafter %.2fB params", meta["build_s"],
             meta["verifier_params_b"], meta["drafter_params_b"])

    t0 = time.perf_counter()
    result["checks"] = device_checks(verifier_model, device)
    meta["checks_s"] = time.perf_counter() - t0
    slots, max_context = args.slots, args.max_context
    t0 = time.perf_counter()
    verifier = await start_verifier(
        VerifierConfig(model="llama3-8b-shape/random", num_slots=slots, max_context=max_context, batch_wait_ms=0.0,
                       dtype="float32" if tiny else "bfloat16", device=device.type,
                       profile_batch_tokens=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), idle_ttl_s=0),
        model=verifier_model)
    drafter_core = ControlledAcceptanceDrafter(ModelRunner(service_drafter_model, slots, max_context),
                                               name="controlled-acceptance/llama-0.75b-shape", draft_top_k=8)
    drafter = await start_drafter(
        DrafterConfig(model="controlled-acceptance", num_slots=slots, max_context=max_context,
                      draft_ahead_tokens=0, batch_wait_ms=1.0, max_draft_tokens=16, idle_ttl_s=0,
                      dtype="float32" if tiny else "bfloat16", device=str(drafter_device),
                      profile_batch_sizes=(1, 16, 64)),
        drafter_core=drafter_core)
    meta["services_start_s"] = time.perf_counter() - t0
    result["verifier_profile_ms"] = [(b, 1000 * s) for b, s in verifier.profile.cost_table]
    vrunner, drunner = verifier.core.runner, drafter_core.runner

    # Cost curves on the services' own worker threads (nothing else runs meanwhile).
    context = 16 if tiny else 256
    reps = 3 if tiny else 10
    big = [(1, 1), (1, 2), (1, 4), (1, 6), (1, 8), (4, 4), (16, 1), (16, 4), (16, 8), (32, 4), (64, 1), (64, 2),
           (64, 4), (64, 8)]
    eager = [(1, 1), (1, 4), (16, 4), (64, 4)]
    t0 = time.perf_counter()
    result["verifier_cost"] = await verifier.batcher.run_exclusive(
        lambda: cost_curves(vrunner, big, eager, context=context, reps=reps))
    result["drafter_cost"] = await drafter.worker.run_exclusive(
        lambda: cost_curves(drunner, [(1, 1), (4, 1), (16, 1), (64, 1), (1, 4)], [(1, 1), (16, 1), (64, 1)],
                            context=context, reps=reps, drafter_top_k=8))
    if service_drafter_model is not drafter_model:
        # What a step of the same drafter with its full LM head costs (the draft vocabulary's gain).
        full_runner = ModelRunner(drafter_model, slots, max_context)
        result["drafter_cost_full_vocab"] = await drafter.worker.run_exclusive(
            lambda: cost_curves(full_runner, [(1, 1), (16, 1), (64, 1)], [], context=context, reps=reps,
                                drafter_top_k=8))
        del full_runner
    # Without the fused kernels (specmesh/fused_ops.py): what they buy, and the baselines as
    # they were (the old padded runner and plain HF generate had none).
    def unfused(model, runner, work):
        fused_ops.uninstall(model)
        if runner.packed is not None and runner.packed.graphs is not None:
            runner.packed.graphs.clear()
        try:
            return work()
        finally:
            fused_ops.install(model)
            if runner.packed is not None and runner.packed.graphs is not None:
                runner.packed.graphs.clear()

    def verifier_unfused():
        out = {"verifier_cost_unfused": cost_curves(vrunner, [(1, 1), (16, 4), (64, 4)], [], context=context,
                                                     reps=reps)}
        if not args.skip_baselines:
            out["verifier_cost_padded_layout"] = padded_cost(verifier_model, [(1, 1), (16, 4), (64, 4)], slots=64,
                                                             max_context=max_context, context=context, reps=reps)
            out["hf_generate"] = [hf_generate(verifier_model, b, 8 if tiny else 32, 128, device) for b in (1, 16)]
            if drafter_device == device:  # HF wants the assistant on the model's device
                out["hf_assisted"] = hf_assisted(verifier_model, drafter_model, 32 if tiny else args.max_tokens, 96,
                                                 device)
        return out

    try:
        result.update(await verifier.batcher.run_exclusive(lambda: unfused(verifier_model, vrunner, verifier_unfused)))
        result["drafter_cost_unfused"] = await drafter.worker.run_exclusive(lambda: unfused(
            service_drafter_model, drunner, lambda: cost_curves(drunner, [(1, 1), (64, 1)], [], context=context, reps=reps,
                                                        drafter_top_k=8)))
    except Exception as error:  # noqa: BLE001 - the A/B is a side measurement; the load run matters more
        log.exception("unfused measurements failed")
        result["unfused_error"] = repr(error)
    meta["cost_curves_s"] = time.perf_counter() - t0
    v1 = next(r["ms"] for r in result["verifier_cost"] if r["batch_tokens"] == 1)
    d1 = next(r["ms"] for r in result["drafter_cost"] if r["sessions"] == 1 and r["tokens_per_session"] == 1)
    result["cost_ratio_c"] = d1 / v1

    # Graphs for the shapes the load will hit, captured before the clock runs.
    t0 = time.perf_counter()
    if vrunner.packed is not None:
        # Verify batches: each of r sessions feeds 1 to 9 tokens; draft steps: 1 to 3 per session.
        # Sessions may sit in slots up to twice their number (slots of sessions just finished,
        # not yet released), and contexts start under 128 tokens: a shape first met during the
        # load was captured there (~100 ms each; 14 in the first level's warm-up), and those
        # rounds are what the adaptive policy's cost fits learned first.
        verify_shapes = [(n, s) for r in args.levels for s in (r, 2 * r) for n in range(r, 9 * r + 1, max(1, r // 4))]
        draft_shapes = [(n, s) for r in args.levels for s in (r, 2 * r) for n in range(r, 3 * r + 1, max(1, r // 2))]
        read_lengths = [128, 256, 512]
        await verifier.batcher.run_exclusive(lambda: vrunner.packed.capture(verify_shapes, read_lengths))
        await drafter.worker.run_exclusive(lambda: drunner.packed.capture(draft_shapes, read_lengths))
    meta["graph_capture_s"] = time.perf_counter() - t0
    meta["graphs"] = {"verifier": len(vrunner.packed.graphs) if vrunner.packed and vrunner.packed.graphs else 0,
                      "drafter": len(drunner.packed.graphs) if drunner.packed and drunner.packed.graphs else 0}
    # A runner whose capture failed runs every shape eagerly from then on: its numbers are not
    # comparable with any other run's, so the table says so.
    meta["graph_capture_failed"] = [name for name, runner in (("verifier", vrunner), ("drafter", drunner))
                                    if runner.packed is not None and runner.packed.graphs is not None
                                    and runner.packed.graphs.disabled]
    log.info("setup done at %.0f s: %s", time.perf_counter() - started, meta)

    # One adaptive scheduler per alpha (each learns its own calibration), one with a fixed gamma;
    # in a process of their own, and the clients in another (scripts/bench_processes.py).
    configs = {}
    for alpha in args.alphas:
        configs[str(alpha)] = dict(verifiers=(verifier.address,), drafters=(drafter.address,), policy="adaptive",
                                   max_draft_tokens=args.max_draft_tokens, max_batch_sessions=slots,
                                   connect_wait_s=30)
    if args.fixed_gamma > 0:
        configs["fixed"] = dict(verifiers=(verifier.address,), drafters=(drafter.address,), policy="fixed",
                                draft_length=args.fixed_gamma, max_batch_sessions=slots, connect_wait_s=30)
    if args.lanes > 1:
        # The same policies with pipeline lanes (scheduler/speculation_loop.py); their own calibration.
        for name in [str(a) for a in args.fixed_alphas] + (["fixed"] if args.fixed_gamma > 0 else []):
            configs[f"{name}/lanes"] = dict(configs[name], pipeline_lanes=args.lanes)
    t0 = time.perf_counter()
    schedulers = SchedulerHost(configs)
    clients = ClientHost(await schedulers.call("addresses"))
    meta["side_processes_start_s"] = time.perf_counter() - t0

    def graph_state() -> dict:
        out = {}
        for name, runner in (("verifier", vrunner), ("drafter", drunner)):
            graphs = runner.packed.graphs if runner.packed is not None else None
            out[name] = {"graphs": len(graphs), "capture_s": graphs.capture_seconds} if graphs is not None else {}
        return out

    verify_clock = BusyClock(verifier.core, "verify")
    draft_clock = BusyClock(drafter_core, "draft")
    vocab = verifier_model.config.vocab_size
    rng = random.Random(0)
    counter = iter(range(10**9))

    def prompts(n: int) -> list[list[int]]:
        return [[rng.randrange(vocab) for _ in range(rng.randint(64, 128))] for _ in range(n)]

    async def run_slice(scheduler: str, batch: list[list[int]], speculation: bool,
                        ids: list[str]) -> tuple[list[dict], dict]:
        verify_clock.take(), draft_clock.take(), await schedulers.call("rounds")
        samples, wall = await clients.run(scheduler, ids, batch, args.max_tokens, speculation)
        summary = summarise(samples, wall, verify_clock.take(), draft_clock.take())
        summary.update(await schedulers.call("rounds"))
        return samples, summary

    async def controlled(alpha: float, batch: list[list[int]], references: list[list[int]], policy: str = "adaptive"):
        """policy: adaptive, fixed (gamma), or ahead (adaptive, the drafter drafting ahead while
        verification runs: PEARL-style, drafter/draft_worker.py); a "/lanes" suffix runs it on
        the scheduler with pipeline lanes."""
        ids = [f"a{alpha}-{policy}-{next(counter)}" for _ in batch]
        for rid, prompt, ref in zip(ids, batch, references):
            drafter_core.register(rid, prompt + ref, alpha)
        drafter.worker.draft_ahead_tokens = args.draft_ahead if policy.startswith("ahead") else 0
        try:
            base, _, lanes = policy.partition("/")
            scheduler = ("fixed" if base == "fixed" else str(alpha)) + ("/lanes" if lanes else "")
            samples, summary = await run_slice(scheduler, batch, True, ids)
        finally:
            drafter.worker.draft_ahead_tokens = 0
        summary["diverged_sessions"] = drafter_core.num_diverged_among(ids)
        drafter_core.forget(ids)
        return samples, summary

    # Warm-up: every scheduler learns its acceptance; graphs and allocator settle.
    t0 = time.perf_counter()
    warm = prompts(4)
    warm_refs, _ = await run_slice(str(args.alphas[0]), warm, False, [f"w{next(counter)}" for _ in warm])
    # Exploration: the adaptive policy's first rounds draft a fixed 4 tokens, then it decides.
    await schedulers.call("explore", 4)
    try:
        for alpha in args.alphas:
            await controlled(alpha, warm, [s["tokens"] for s in warm_refs])
    finally:
        await schedulers.call("explore", 0)
    for alpha in args.alphas:
        await controlled(alpha, warm, [s["tokens"] for s in warm_refs])
    meta["warmup_s"] = time.perf_counter() - t0

    levels = []
    for concurrency in args.levels:
        if time.perf_counter() - started > args.budget_s:
            log.warning("time budget spent: skipping concurrency %d", concurrency)
            result.setdefault("skipped_levels", []).append(concurrency)
            continue
        modes: dict[str, list[dict]] = {"off": []}
        # A round's syncs come as one batch message, drafted at once; the batch window (1 ms)
        # only applies to syncs from other streams, of which there are none here.
        policies = ["adaptive"] + (["fixed"] if args.fixed_gamma > 0 else []) + (["ahead"] if args.draft_ahead else [])
        if args.lanes > 1 and concurrency >= 2 * 8:  # lanes split only from 8 sessions each
            policies += ["adaptive/lanes"] + (["fixed/lanes"] if args.fixed_gamma > 0 else [])
        repeats = args.repeats
        per_slice = max(concurrency, args.min_requests // repeats) if concurrency == 1 else concurrency
        captured = graph_state()
        # Repeat 0 is a warm-up at this concurrency (new graph shapes, calibration), not counted.
        for repeat in range(repeats + 1):
            measured = repeat > 0
            batch = prompts(per_slice if measured else concurrency)
            samples_off = []
            for start in range(0, len(batch), concurrency):
                samples, summary = await run_slice(str(args.alphas[0]), batch[start:start + concurrency], False,
                                                   [f"off-{next(counter)}" for _ in range(concurrency)])
                samples_off.extend(samples)
                if measured:
                    modes["off"].append(summary)
            references = [s["tokens"] for s in samples_off]
            for alpha in args.alphas:
                for policy in (p for p in policies if p == "adaptive" or alpha in args.fixed_alphas):
                    for start in range(0, len(batch), concurrency):
                        _, summary = await controlled(alpha, batch[start:start + concurrency],
                                                      references[start:start + concurrency], policy)
                        if measured:
                            base, _, lanes = policy.partition("/")
                            name = f"a{alpha} " + {"adaptive": "adapt", "fixed": f"fix{args.fixed_gamma}",
                                                   "ahead": f"ahead{args.draft_ahead}"}[base]
                            name += f" L{args.lanes}" if lanes else ""
                            modes.setdefault(name, []).append(summary)
            if repeat == 0:
                captured = graph_state()  # graphs captured after the warm-up show in graphs_at_end
        level = {"concurrency": concurrency, "modes": {}, "graphs_at_start": captured, "graphs_at_end": graph_state(),
                 # What each adaptive scheduler's plans believe a round costs, per load bucket.
                 "policy_fits": await schedulers.call("policy_fits", None)}
        for mode, slices in modes.items():
            level["modes"][mode] = merge(slices)
        base = level["modes"]["off"]
        for mode, summary in level["modes"].items():
            summary["aggregate_vs_off"] = summary["aggregate_tokens_per_s"] / base["aggregate_tokens_per_s"]
            summary["per_user_vs_off"] = summary["per_user_tokens_per_s"] / base["per_user_tokens_per_s"]
            if mode != "off":
                alpha = float(mode.split()[0][1:])
                summary["ceiling"] = ceiling(summary["alpha_hat"], summary["gamma"], result["cost_ratio_c"])
                summary["ceiling_nominal_alpha"] = ceiling(alpha, summary["gamma"], result["cost_ratio_c"])
        levels.append(level)
        log.info("level %d done at %.0f s", concurrency, time.perf_counter() - started)
    result["levels"] = levels
    meta["total_s"] = time.perf_counter() - started
    await clients.stop()
    await schedulers.stop()
    for service in (drafter, verifier):
        await service.stop()
    return result


def merge(slices: list[dict]) -> dict:
    """Combine slices of one mode: token-weighted rates, summed counts."""
    wall = sum(s["wall_s"] for s in slices)
    tokens = sum(s["completion_tokens"] for s in slices)
    requests = sum(s["requests"] for s in slices)
    out = {"slices": len(slices), "requests": requests, "completion_tokens": tokens, "wall_s": wall,
           "aggregate_tokens_per_s": tokens / wall if wall else 0.0}
    out["per_user_tokens_per_s"] = sum(s["per_user_tokens_per_s"] * s["requests"] for s in slices) / requests
    for key in ("ttft_p50_ms", "tpot_p50_ms", "tpot_p99_ms"):
        out[key] = statistics.median(s[key] for s in slices)
    for key in ("drafted", "accepted", "rounds", "verifier_busy_s", "verify_forwards", "drafter_busy_s",
                "draft_calls", "diverged_sessions", "alpha_trials", "alpha_accepted", "policy_rounds",
                *(f"sched_{phase}_{unit}" for phase in ("round", "draft_call", "verify_call") for unit in ("s", "calls"))):
        out[key] = sum(s.get(key, 0) for s in slices)
    # Mean milliseconds per call: a scheduler round, its Draft and Verify calls as the scheduler
    # sees them, and the cores' own work behind them (forwards and the Python around them).
    for phase in ("round", "draft_call", "verify_call"):
        calls = out[f"sched_{phase}_calls"]
        out[f"sched_{phase}_ms"] = 1000 * out[f"sched_{phase}_s"] / calls if calls else 0.0
    out["verifier_core_ms"] = 1000 * out["verifier_busy_s"] / out["verify_forwards"] if out["verify_forwards"] else 0.0
    out["drafter_core_ms"] = 1000 * out["drafter_busy_s"] / out["draft_calls"] if out["draft_calls"] else 0.0
    out["alpha_hat"] = out["alpha_accepted"] / out["alpha_trials"] if out["alpha_trials"] else 0.0
    out["acceptance_rate"] = out["accepted"] / out["drafted"] if out["drafted"] else 0.0
    out["tau"] = (out["accepted"] + out["rounds"]) / out["rounds"] if out["rounds"] else 0.0
    out["gamma"] = out["drafted"] / out["rounds"] if out["rounds"] else 0.0
    out["verifier_busy_fraction"] = out["verifier_busy_s"] / wall if wall else 0.0
    return out


def _interpolate(points: list[tuple[float, float]], x: float) -> float:
    points = sorted(points)
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    (x0, y0), (x1, y1) = points[-2], points[-1]
    return y1 + (y1 - y0) * (x - x1) / (x1 - x0)


def gpu_bound(result: dict, concurrency: int, gamma: float, tau: float) -> float | None:
    """The speedup if a round cost only its GPU work, on one GPU shared by drafter and verifier:
    tau * verify(c x 1) / (verify(c x (gamma + 1)) + gamma * draft_step(c)), from the measured
    cost curves. What the services could reach with no RPC, Python or scheduling at all."""
    verify = [(r["tokens_per_session"], r["ms"]) for r in result.get("verifier_cost", [])
              if r["sessions"] == concurrency]
    steps = [(r["sessions"], r["ms"]) for r in result.get("drafter_cost", []) if r["tokens_per_session"] == 1]
    if len(verify) < 2 or len(steps) < 2:
        return None
    plain = _interpolate(verify, 1)
    spec = _interpolate(verify, gamma + 1) + gamma * _interpolate(steps, concurrency)
    return tau * plain / spec


def describe_fit(fit: dict | None) -> str:
    return f"{fit['intercept_ms']:.2f} + {fit['slope_ms']:.4f}x (w {fit['weight']:.0f})" if fit else "-"


def table(result: dict) -> str:
    lines = []
    meta = result["meta"]
    for name, check in result.get("checks", {}).items():
        lines.append(f"check {name}: relative error {check['relative_error_max']:.2e}, argmax agreement "
                     f"{check['argmax_agreement']:.1%}, {check['graph_forwards']} graph forwards")
    lines.append(f"device: {meta['device']}  torch {meta['torch']}  transformers {meta['transformers']}  "
                 f"verifier {meta['verifier_params_b']:.2f}B  drafter {meta['drafter_params_b']:.2f}B  "
                 f"c = {result['cost_ratio_c']:.3f}  drafter on {meta.get('drafter_device', 'the same device')}")
    curve = result["verifier_cost"]
    lines.append("verifier ms/forward by batch tokens (sessions x tokens): " + ", ".join(
        f"{r['sessions']}x{r['tokens_per_session']}={r['ms']:.2f}" + (f" (eager {r['ms_eager']:.1f})" if "ms_eager" in r else "")
        for r in curve))
    lines.append("drafter ms/step by sessions: " + ", ".join(
        f"{r['sessions']}x{r['tokens_per_session']}={r['ms']:.2f}" + (f" (eager {r['ms_eager']:.1f})" if "ms_eager" in r else "")
        for r in result["drafter_cost"]))
    if "drafter_cost_full_vocab" in result:
        lines.append(f"drafter with its full LM head (the services' drafts from {result['meta']['args']['draft_vocab']} "
                     "tokens) ms/step: " + ", ".join(f"{r['sessions']}x{r['tokens_per_session']}={r['ms']:.2f}"
                                                     for r in result["drafter_cost_full_vocab"]))
    for name in ("verifier_cost_unfused", "drafter_cost_unfused"):
        if name in result:
            lines.append(f"{name.split('_')[0]} without fused norms ms: " + ", ".join(
                f"{r['sessions']}x{r['tokens_per_session']}={r['ms']:.2f}" for r in result[name]))
    if "verifier_cost_padded_layout" in result:
        lines.append("old padded layout (eager) ms: " + ", ".join(
            f"{r['sessions']}x{r['tokens_per_session']}={r['ms']:.1f}" for r in result["verifier_cost_padded_layout"]))
    if "hf_generate" in result:
        lines.append("HF generate: " + ", ".join(
            f"batch {r['batch']}: {r['ms_per_step']:.1f} ms/step, {r['aggregate_tokens_per_s']:.0f} tok/s"
            for r in result["hf_generate"]))
    lines.append(f"{'conc':>4} {'mode':>15} {'agg tok/s':>9} {'x off':>6} {'user tok/s':>10} {'x off':>6} "
                 f"{'alpha^':>6} {'gamma':>5} {'tau':>5} {'ttft ms':>7} {'tpot ms':>7} {'v.busy':>6} {'ceiling':>7} "
                 f"{'gpu bnd':>7}")
    for level in result.get("levels", []):
        for mode, s in level["modes"].items():
            lines.append(
                f"{level['concurrency']:>4} {mode:>15} {s['aggregate_tokens_per_s']:>9.1f} {s['aggregate_vs_off']:>6.2f} "
                f"{s['per_user_tokens_per_s']:>10.1f} {s['per_user_vs_off']:>6.2f} {s['alpha_hat']:>6.1%} "
                f"{s['gamma']:>5.2f} {s['tau']:>5.2f} {s['ttft_p50_ms']:>7.1f} {s['tpot_p50_ms']:>7.2f} "
                f"{s['verifier_busy_fraction']:>6.1%} {s.get('ceiling', 1.0):>7.2f} "
                f"{gpu_bound(result, level['concurrency'], s['gamma'], s['tau']) or 0.0:>7.2f}")
    lines.append("where a round goes (ms per call; scheduler's view, then the cores' own work behind it):")
    lines.append(f"{'conc':>4} {'mode':>15} {'round':>6} {'draft':>6} {'d.core':>6} {'verify':>6} {'v.core':>6}")
    for level in result.get("levels", []):
        for mode, s in level["modes"].items():
            lines.append(f"{level['concurrency']:>4} {mode:>15} {s.get('sched_round_ms', 0):>6.1f} "
                         f"{s.get('sched_draft_call_ms', 0):>6.1f} {s.get('drafter_core_ms', 0):>6.1f} "
                         f"{s.get('sched_verify_call_ms', 0):>6.1f} {s.get('verifier_core_ms', 0):>6.1f}")
    fitted = [(level["concurrency"], name, fits) for level in result.get("levels", [])
              for name, fits in (level.get("policy_fits") or {}).items()]
    if fitted:
        lines.append("adaptive policy's fits at the level's own load (ms; draft: per call + per step; "
                     "verify beyond profile, rounds with drafts and without: per round + per batch token):")
        for concurrency, name, fits in fitted:
            bucket = load_bucket(concurrency)
            draft, overhead = fits.get("draft", {}).get(bucket), fits.get("verify_overhead", {}).get(bucket)
            plain = fits.get("plain_overhead", {}).get(bucket)
            lines.append(f"{concurrency:>4} scheduler {name:>6}: draft {describe_fit(draft)}; "
                         f"verify {describe_fit(overhead)}; without drafts {describe_fit(plain)}")
    if "hf_assisted" in result:
        hf = result["hf_assisted"]
        lines.append(f"HF assisted generation (batch 1, assistant = the drafter, agreeing on every greedy token): "
                     f"{hf['tokens_per_s']:.1f} tok/s, assistant agreement {hf.get('assistant_greedy_agreement', float('nan')):.0%}, "
                     f"output equals plain greedy: {hf['equals_plain_greedy']}")
        for level in result.get("levels", []):
            mode = level["modes"].get("a1.0 adapt")
            if mode and level["concurrency"] in (1, 16):
                lines.append(f"  specmesh alpha 1.0 adaptive at concurrency {level['concurrency']}: "
                             f"{mode['per_user_tokens_per_s']:.1f} tok/s per user "
                             f"({mode['per_user_tokens_per_s'] / hf['tokens_per_s']:.2f}x), "
                             f"{mode['aggregate_tokens_per_s']:.0f} aggregate "
                             f"({mode['aggregate_tokens_per_s'] / hf['tokens_per_s']:.2f}x HF assisted serving users one by one)")
    if result.get("skipped_levels"):
        lines.append(f"skipped (time budget): concurrency {result['skipped_levels']}")
    failed = result.get("meta", {}).get("graph_capture_failed")
    if failed:
        lines.append(f"NOT COMPARABLE: CUDA graph capture failed for the {' and '.join(failed)}, which ran eagerly")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--levels", default="1,16,64")
    parser.add_argument("--alphas", default="0.6,0.8,0.9,1.0")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-draft-tokens", type=int, default=8)
    parser.add_argument("--drafter-device", default="",
                        help="put the drafter on this device (e.g. cuda:1: a GPU of its own); default: the verifier's")
    parser.add_argument("--draft-vocab", type=int, default=32768,
                        help="the services' drafter drafts from this many tokens (0: its full vocabulary)")
    parser.add_argument("--lanes", type=int, default=1,
                        help="also run adaptive and fixed at --fixed-alphas with this many pipeline lanes (1: no)")
    parser.add_argument("--draft-ahead", type=int, default=0,
                        help="also run adaptive with the drafter drafting this far ahead (0: no) at --fixed-alphas")
    parser.add_argument("--fixed-gamma", type=int, default=4, help="also run a fixed-gamma scheduler (0: no)")
    parser.add_argument("--fixed-alphas", default="0.8", help="alphas the fixed-gamma scheduler runs")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=6, help="requests per mode at concurrency 1")
    parser.add_argument("--slots", type=int, default=72)
    parser.add_argument("--max-context", type=int, default=512)
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip remaining levels after this")
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny models: checks the flow, no numbers")
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    args.alphas = [float(x) for x in args.alphas.split(",")]
    args.fixed_alphas = [float(x) for x in args.fixed_alphas.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("specmesh.cuda_graphs").setLevel(logging.INFO)
    result = asyncio.run(main_async(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps(result, indent=1))
    text = table(result)
    (out / "gpu_bench_table.txt").write_text(text + "\n")
    print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
