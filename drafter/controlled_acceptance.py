"""BENCHMARK ONLY: a drafter core with a controlled acceptance rate.

It runs its model's real forward passes and its real sampler (so drafting costs what a real
drafter of that shape costs), then proposes, instead of the model's own token, the verifier's
reference greedy continuation with each token replaced by a wrong one with probability 1 - alpha.
Under greedy verification every draft token is then accepted independently with probability
alpha (given the drafts before it were): the textbook model behind the analytic speedup
ceiling, which isolates the system's own efficiency from the quality of a drafter. Without
trained weights (benchmarks on random weights of real shapes) this is the only way to measure
what a given acceptance rate buys.

The benchmark registers, per session id, the reference sequence (prompt + the verifier's own
greedy continuation, e.g. from a speculation-off run of the same prompt) and alpha. Positions
without a reference fall back to the model's own token. Corruption is keyed by (seed, session,
position), so drafting ahead and re-drafting propose the same tokens. Confidence is alpha for
every token (calibrated but uninformative: the scheduler can learn the rate, not which tokens
are wrong). In low precision the verifier's batched kernels can flip a near-tie, after which
its continuation leaves the reference and later proposals are rejected; `num_diverged_among` counts
such sessions, and the benchmark reports the acceptance it measured, not the alpha it asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from drafter.drafting import ModelDrafter, _Path
from specmesh.distributions import derive_seed
from specmesh.model_runner import ModelRunner
from specmesh.records import SparseDistribution

_SCALE = float(2**63)


@dataclass
class _Plan:
    reference: list[int]
    alpha: float
    proposals: list[int]  # per position: the reference token, or its corrupted replacement
    checked: int = 0  # committed prefix already compared with the reference
    diverged_at: int | None = None


class ControlledAcceptanceDrafter(ModelDrafter):
    def __init__(self, runner: ModelRunner, name: str = "controlled-acceptance", seed: int = 0, **kwargs) -> None:
        super().__init__(runner, name=name, **kwargs)
        self.seed = seed
        self._plans: dict[str, _Plan] = {}
        self.num_proposed = 0
        self.num_corrupted = 0

    def register(self, session_id: str, reference: Sequence[int], alpha: float) -> None:
        """reference: the whole sequence (prompt, then the verifier's greedy continuation)."""
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        # Decided here, once per position, rather than per draft on the drafter's critical
        # path: the draws are keyed by position anyway, and hashing them per token cost the
        # benchmark ~1.5 ms per round at 64 sessions, which a real drafter does not pay.
        vocab = self.vocab_size  # the model's vocabulary, not its LM head's rows (a draft vocabulary)
        proposals = []
        for position, token in enumerate(reference):
            if self._uniform(session_id, position, "keep") >= alpha:
                token = (token + 1 + int(self._uniform(session_id, position, "wrong") * (vocab - 1))) % vocab
            proposals.append(token)
        self._plans[session_id] = _Plan(list(reference), alpha, proposals)

    def forget(self, session_ids: Sequence[str]) -> None:
        for sid in session_ids:
            self._plans.pop(sid, None)

    def num_diverged_among(self, session_ids: Sequence[str]) -> int:
        """How many of these sessions committed a token off their reference (see module doc)."""
        return sum(1 for sid in session_ids if sid in self._plans and self._plans[sid].diverged_at is not None)

    def _uniform(self, session_id: str, position: int, salt: str) -> float:
        return derive_seed(self.seed, session_id, position, salt) / _SCALE

    def _pick(self, logits: torch.Tensor, paths: Sequence[_Path]) -> list[tuple[int, float, SparseDistribution]]:
        picks = super()._pick(logits, paths)  # the real sampler's cost, and the fallback
        out = []
        for path, pick in zip(paths, picks):
            plan = self._plans.get(path.session_id)
            position = len(path.tokens)
            if plan is None or position >= len(plan.reference):
                out.append(pick)
                continue
            self._check_committed(plan, path)
            token = plan.proposals[position]
            self.num_proposed += 1
            self.num_corrupted += token != plan.reference[position]
            out.append((token, plan.alpha, SparseDistribution((token,), (1.0,))))
        return out

    @staticmethod
    def _check_committed(plan: _Plan, path: _Path) -> None:
        """Note where the committed tokens first left the reference (diagnostics only)."""
        end = min(path.drafts_from, len(path.tokens), len(plan.reference))
        if plan.diverged_at is not None or end <= plan.checked:
            return
        for i in range(plan.checked, end):
            if path.tokens[i] != plan.reference[i]:
                plan.diverged_at = i
                return
        plan.checked = end
