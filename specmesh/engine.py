"""The in-process engine: drafter, verifier and speculation loop in one Python process.

This is what `specmesh generate` runs without `--target`, and what tests drive. It uses the
same cores and the same loop as the services; only the transport is missing.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

import torch

from specmesh.drafter_refs import early_exit_model, parse_drafter_ref
from specmesh.errors import InvalidRequestError
from specmesh.model_loading import check_tokenizers_compatible, eos_token_ids, load_causal_lm
from specmesh.model_runner import ModelRunner
from specmesh.records import SpeculationStats
from specmesh.sampling_params import SamplingParams, validate_max_tokens

DEFAULT_VERIFIER = "smollm2-135m"
DEFAULT_DRAFTER = "prompt-lookup"


@dataclass(frozen=True)
class EngineConfig:
    num_slots: int = 16  # concurrent sessions (KV slots) per model
    max_context: int = 2048  # tokens per session, prompt + output + drafts
    draft_length: int = 4  # tokens drafted and verified per round
    draft_top_k: int = 8  # size of the sparse q the drafter sends
    max_tokens_limit: int = 4096
    pipeline_lanes: int = 1  # rounds in flight at once (scheduler/speculation_loop.py)
    # "fixed": draft_length every round. "adaptive": the scheduler's policy (confidence x load,
    # scheduler/budget_policy.py) with in-memory calibration, priced by a cost profile of the
    # verifier measured when the engine is built (~1 s on a CPU), up to max_draft_tokens.
    policy: str = "fixed"
    max_draft_tokens: int = 8
    lane_min_sessions: int = 8
    # Model drafters copy from the context where it repeats and the model is unsure
    # (drafter/context_copy.py).
    context_copy: bool = True


@dataclass
class GenerationOutput:
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    logprobs: list[float] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.stats.accepted_tokens / self.stats.drafted_tokens if self.stats.drafted_tokens else 0.0


class Engine:
    def __init__(self, verifier_model: torch.nn.Module, tokenizer, drafter=None,
                 config: EngineConfig = EngineConfig(), stop_token_ids: Sequence[int] | None = None) -> None:
        # Deferred imports: the service packages depend on specmesh, not the other way round.
        from scheduler.backends import LocalDraftBackend, LocalVerifyBackend
        from scheduler.draft_policy import FixedDraftLength, check_policy_name
        from verifier.verification import VerifierCore

        self.config = config
        self.tokenizer = tokenizer
        self.verifier_model = verifier_model
        self.drafter = drafter
        self.verifier = VerifierCore(ModelRunner(verifier_model, config.num_slots, config.max_context))
        self.stop_token_ids = frozenset(
            stop_token_ids if stop_token_ids is not None else eos_token_ids(verifier_model, tokenizer)
        )
        self._verify_backend = LocalVerifyBackend(self.verifier)
        self._draft_backend = LocalDraftBackend(drafter) if drafter is not None else None
        check_policy_name(config.policy)
        self._policy = FixedDraftLength(config.draft_length) if config.policy == "fixed" else self._adaptive_policy()
        self._loops: dict[int, object] = {}  # one speculation loop per event loop

    def _adaptive_policy(self):
        from scheduler.budget_policy import AdaptiveBudgetPolicy, model_pair_id
        from scheduler.calibration import CalibrationConfig
        from scheduler.calibration_store import InMemoryCalibrationStore
        from scheduler.cost_model import CostProfile
        from verifier.config import DEFAULT_PROFILE_BATCH_TOKENS
        from verifier.profiling import measure_forward_costs

        sizes = [size for size in DEFAULT_PROFILE_BATCH_TOKENS if size <= 4 * self.config.num_slots]
        profile = CostProfile.from_table(measure_forward_costs(self.verifier, sizes))
        drafter = getattr(self.drafter, "name", "drafter")
        return AdaptiveBudgetPolicy(InMemoryCalibrationStore(CalibrationConfig()), profile,
                                    model_pair_id(getattr(self.verifier_model, "name_or_path", "verifier"), drafter),
                                    self.config.max_draft_tokens)

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_refs(cls, verifier: str = DEFAULT_VERIFIER, drafter: str = DEFAULT_DRAFTER,
                  config: EngineConfig = EngineConfig(), dtype: torch.dtype = torch.float32,
                  device: str = "cpu") -> "Engine":
        loaded = load_causal_lm(verifier, dtype=dtype, device=device)
        return cls(loaded.model, loaded.tokenizer,
                   build_drafter(drafter, loaded.model, loaded.tokenizer, config, dtype, device), config)

    # ---- generation -------------------------------------------------------------------------
    def _loop(self):
        from scheduler.speculation_loop import SpeculationLoop

        key = id(asyncio.get_running_loop())
        if key not in self._loops:
            self._loops = {key: SpeculationLoop(self._verify_backend, self._draft_backend, self._policy,
                                                context_limit=self.config.max_context,
                                                max_batch_sessions=self.config.num_slots,
                                                lanes=self.config.pipeline_lanes,
                                                lane_min_sessions=self.config.lane_min_sessions)}
        return self._loops[key]

    def encode(self, prompt: str | None = None, messages: Sequence[dict] | None = None) -> list[int]:
        if messages:
            ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        if not prompt:
            raise InvalidRequestError("prompt must not be empty")
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def make_session(self, prompt_ids: Sequence[int], params: SamplingParams, max_tokens: int, *,
                     disable_speculation: bool = False, max_draft_tokens: int | None = None,
                     logprobs: bool = False, session_id: str | None = None):
        from scheduler.session import Session

        if not prompt_ids:
            raise InvalidRequestError("prompt must not be empty")
        params.validate()
        validate_max_tokens(max_tokens, self.config.max_tokens_limit)
        vocab = self.verifier.runner.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise InvalidRequestError(f"prompt token ids must lie in [0, {vocab})")
        if len(prompt_ids) + max_tokens > self.config.max_context:
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the context "
                f"limit of {self.config.max_context} tokens"
            )
        if max_draft_tokens is not None and max_draft_tokens < 0:
            raise InvalidRequestError(f"max_draft_tokens must be >= 0, got {max_draft_tokens}")
        return Session(
            session_id=session_id or uuid.uuid4().hex,
            prompt_tokens=list(prompt_ids),
            params=params.with_seed(),
            max_tokens=max_tokens,
            stop_token_ids=self.stop_token_ids,
            disable_speculation=disable_speculation,
            max_draft_tokens=max_draft_tokens,
            want_logprobs=logprobs,
        )

    async def stream(self, session) -> AsyncIterator:
        async for commit in self._loop().stream(session):
            yield commit

    async def generate_ids_async(self, prompt_ids: Sequence[int], params: SamplingParams = SamplingParams(),
                                 max_tokens: int = 64, **options) -> GenerationOutput:
        session = self.make_session(prompt_ids, params, max_tokens, **options)
        tokens: list[int] = []
        logprobs: list[float] = []
        finish = ""
        async for commit in self.stream(session):
            tokens += commit.token_ids
            logprobs += commit.logprobs
            finish = commit.finish_reason or finish
        text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else ""
        return GenerationOutput(tokens, text, finish,
                                len(prompt_ids), session.stats, logprobs)

    def generate_batch_ids(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
                           = SamplingParams(), max_tokens: int = 64, **options) -> list[GenerationOutput]:
        """Run many prompts concurrently (they share every round's verify batch)."""
        all_params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)

        async def run() -> list[GenerationOutput]:
            return await asyncio.gather(*(self.generate_ids_async(p, sp, max_tokens, **options)
                                          for p, sp in zip(prompts, all_params)))

        return asyncio.run(run())

    def generate(self, prompt: str | None = None, *, messages: Sequence[dict] | None = None,
                 params: SamplingParams = SamplingParams(), max_tokens: int = 64, **options) -> GenerationOutput:
        prompt_ids = self.encode(prompt, messages)
        return asyncio.run(self.generate_ids_async(prompt_ids, params, max_tokens, **options))


def build_drafter(ref: str, verifier_model: torch.nn.Module, verifier_tokenizer, config: EngineConfig,
                  dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A drafter core for REF (see specmesh.drafter_refs), checked against the verifier's tokenizer."""
    from drafter.drafting import ModelDrafter
    from drafter.context_copy import ContextCopyRule
    from drafter.prompt_lookup import PromptLookupDrafter
    from specmesh.drafter_training.export import is_trained_drafter, load_trained_drafter

    spec = parse_drafter_ref(ref)
    copy_rule = ContextCopyRule() if config.context_copy else None
    if spec.kind == "none":
        return None
    if spec.kind == "prompt-lookup":
        return PromptLookupDrafter()
    if spec.kind == "early-exit":
        model = early_exit_model(verifier_model, spec.num_layers)
        runner = ModelRunner(model, config.num_slots, config.max_context)
        return ModelDrafter(runner, name=f"layers:{spec.num_layers}", draft_top_k=config.draft_top_k,
                            context_copy=copy_rule)
    if is_trained_drafter(spec.model_ref):  # `specmesh train-drafter` output: may share the verifier's embedding
        trained = load_trained_drafter(spec.model_ref, verifier_model=verifier_model, dtype=dtype, device=device)
        check_tokenizers_compatible(verifier_tokenizer, trained.tokenizer,
                                    verifier_model.get_input_embeddings().num_embeddings,
                                    trained.model.get_input_embeddings().num_embeddings)
        runner = ModelRunner(trained.model, config.num_slots, config.max_context)
        return ModelDrafter(runner, name=trained.name, draft_top_k=config.draft_top_k,
                            confidence_head=trained.confidence_head, context_copy=copy_rule)
    loaded = load_causal_lm(spec.model_ref, dtype=dtype, device=device)
    check_tokenizers_compatible(verifier_tokenizer, loaded.tokenizer,
                                verifier_model.get_input_embeddings().num_embeddings,
                                loaded.model.get_input_embeddings().num_embeddings)
    runner = ModelRunner(loaded.model, config.num_slots, config.max_context)
    return ModelDrafter(runner, name=loaded.name, draft_top_k=config.draft_top_k, context_copy=copy_rule)
