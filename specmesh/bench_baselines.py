"""What a user would run instead of specmesh, measured in the same `specmesh bench` run:
HF transformers `generate` (plain greedy) and HF assisted generation on the same models —
`assistant_model=` for a model drafter, `prompt_lookup_num_tokens=` for prompt lookup (HF's own
prompt-lookup decoding). One request at a time (HF's `generate` serves one user per call), so
these are concurrency-1 baselines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from specmesh.drafter_refs import parse_drafter_ref


@dataclass
class BaselineResult:
    name: str
    requests: int
    completion_tokens: int
    seconds: float

    def summary(self) -> dict:
        return {"mode": self.name, "concurrency": 1, "requests": self.requests,
                "completion_tokens": self.completion_tokens,
                "aggregate_tokens_per_s": self.completion_tokens / self.seconds if self.seconds else 0.0,
                "per_user_tokens_per_s": self.completion_tokens / self.seconds if self.seconds else 0.0}


def run_hf_baselines(verifier_ref: str, drafter_ref: str, requests: list[dict], max_tokens: int,
                     num_requests: int, draft_length: int = 4) -> list[dict]:
    from specmesh.engine import build_drafter  # noqa: F401 - same REF rules as the services
    from specmesh.model_loading import load_causal_lm

    loaded = load_causal_lm(verifier_ref)
    model, tokenizer = loaded.model, loaded.tokenizer
    spec = parse_drafter_ref(drafter_ref)
    assisted: dict | None
    if spec.kind == "prompt-lookup":
        assisted = {"prompt_lookup_num_tokens": draft_length}
    elif spec.kind == "model":
        assisted = {"assistant_model": load_causal_lm(spec.model_ref).model}
    elif spec.kind == "early-exit":
        from specmesh.drafter_refs import early_exit_model

        assisted = {"assistant_model": early_exit_model(model, spec.num_layers)}
    else:
        assisted = None

    def encode(request: dict) -> torch.Tensor:
        if "messages" in request:
            ids = tokenizer.apply_chat_template(request["messages"], add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids
        else:
            ids = tokenizer(request["prompt"])["input_ids"]
        return torch.tensor([list(ids)])

    chosen = [requests[i % len(requests)] for i in range(num_requests)]
    modes = [("hf-generate", {})] + ([("hf-assisted", assisted)] if assisted is not None else [])
    results = {name: BaselineResult(name, 0, 0, 0.0) for name, _ in modes}
    with torch.inference_mode():
        model.generate(encode(chosen[0]), max_new_tokens=2, do_sample=False)  # warm-up
        for request in chosen:  # interleaved, like the services' modes
            input_ids = encode(request)
            for name, extra in modes:
                start = time.perf_counter()
                out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id or 0, **extra)
                result = results[name]
                result.seconds += time.perf_counter() - start
                result.completion_tokens += out.shape[1] - input_ids.shape[1]
                result.requests += 1
    return [r.summary() for r in results.values()]


def analytic_ceiling(acceptance: float, draft_length: float, cost_ratio: float) -> float:
    """Leviathan et al. (2023): expected speedup for per-token acceptance α, draft length γ and
    drafter/verifier cost ratio c: (1 − α^(γ+1)) / ((1 − α)(γc + 1))."""
    if draft_length <= 0:
        return 1.0
    if acceptance >= 1.0:
        return (draft_length + 1) / (draft_length * cost_ratio + 1)
    return (1 - acceptance ** (draft_length + 1)) / ((1 - acceptance) * (draft_length * cost_ratio + 1))


def plot_bench(summaries: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (aggregate, per_user) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in dict.fromkeys(s["mode"] for s in summaries):
        rows = sorted((s for s in summaries if s["mode"] == mode), key=lambda s: s["concurrency"])
        levels = [r["concurrency"] for r in rows]
        style = "o--" if mode.startswith("hf-") else "o-"
        aggregate.plot(levels, [r["aggregate_tokens_per_s"] for r in rows], style, label=mode)
        per_user.plot(levels, [r["per_user_tokens_per_s"] for r in rows], style, label=mode)
    for axis, title in ((aggregate, "aggregate tokens/s"), (per_user, "per-user tokens/s")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrency")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
