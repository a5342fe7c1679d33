"""The drafter's core: continue many sessions by k tokens each, batched step by step.

Every draft token comes with its confidence (by default the draft probability of the drafted
token) and the exact sparse distribution q it was drawn from, which is what makes verification
lossless. No gRPC here.

Each session keeps its *path*: the tokens it knows in order (committed tokens as of the last
sync, then the tokens it drafted), of which a prefix has its K/V in the session's KV slot.
A sync states what is committed; the drafter keeps the longest prefix of its path that agrees
(drafts the verifier accepted, and a drafted token equal to the verifier's correction or bonus
token, are not recomputed) and drops the rest. `draft_ahead` extends paths while the scheduler
is verifying (PEARL-style overlap of draft and verify); a later sync that confirms the path
gets those tokens without a forward. Draft randomness is keyed by absolute position, so a token
drafted ahead is exactly the token that would be drafted on demand: draft-ahead changes cost,
never output.

A drafter with a draft vocabulary (an LM head over K chosen tokens, `specmesh train-drafter
--draft-vocab K`) produces logits over those K tokens: tokens are drawn, q is built and the
confidence head reads logits in that space, and the drafted index and q's indices are mapped
back to token ids before anything leaves the drafter. q has no mass outside the K tokens,
which the verifier's rejection rule handles like any q.

With a `ContextCopyRule` (drafter/context_copy.py) a step where the model is unsure and the
context repeats proposes the token that followed the match instead, with q the point mass on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from drafter.context_copy import ContextCopyRule, NgramIndex
from specmesh.distributions import draft_distribution, greedy_tokens, make_generator, point_mass
from specmesh.errors import InvalidRequestError
from specmesh.model_runner import ForwardRequest, ModelRunner
from specmesh.records import DraftChunk, DraftRequest, SparseDistribution
from specmesh.sampling_params import SamplingParams
from specmesh.session_slots import SessionSlots

RANDOM_STREAM = "draft"
DEFAULT_DRAFT_TOP_K = 8


def draft_uniform(seed: int, position: int) -> torch.Tensor:
    """The uniform that draws the draft token at absolute sequence position `position`.

    Keyed by position, not by round, so a token drafted ahead of time equals the token that
    would be drafted on demand from the same prefix: draft-ahead and batching never change what
    a seeded request produces. (The verifier uses its own, independent stream.)
    """
    return torch.rand((), generator=make_generator(seed, RANDOM_STREAM, position))


class Drafter(Protocol):
    """What the scheduler needs from any drafter (a model, prompt lookup, ...).

    A core may also offer `draft_ahead(session_ids, num_tokens)` and `ahead_tokens(session_id)`
    (ModelDrafter does); the drafter service drafts ahead only with cores that have them.
    """

    name: str

    def draft(self, requests: Sequence[DraftRequest]) -> list[DraftChunk]: ...

    def release(self, session_ids: Sequence[str]) -> int: ...

    @property
    def num_sessions(self) -> int: ...


def validate_request(request: DraftRequest, vocab_size: int) -> None:
    if not request.session_id:
        raise InvalidRequestError("session_id must not be empty")
    if request.num_cached_tokens < 0 or request.num_draft_tokens < 0:
        raise InvalidRequestError("num_cached_tokens and num_draft_tokens must be >= 0")
    if request.num_draft_tokens > 0 and request.num_cached_tokens + len(request.new_tokens) == 0:
        raise InvalidRequestError("cannot draft from an empty sequence: new_tokens must hold the history")
    for token in request.new_tokens:
        if not 0 <= token < vocab_size:
            raise InvalidRequestError(f"token id {token} outside the vocabulary [0, {vocab_size})")
    if not request.params.greedy and request.params.seed is None:
        raise InvalidRequestError("sampled drafting needs a seed (the scheduler assigns one)")


@dataclass
class _Path:
    """What the drafter knows of one session.

    tokens[:cache length of the slot] have their K/V cached; the rest (at least the last token)
    are fed by the next forward. tokens[drafts_from:] are this drafter's own drafts, each with
    its (confidence, q) in `drafts`, drawn under `params`.
    """

    tokens: list[int] = field(default_factory=list)
    session_id: str = ""
    drafts_from: int = 0
    drafts: list[tuple[float, SparseDistribution]] = field(default_factory=list)
    params: SamplingParams | None = None
    sent_length: int = 0  # end of the tokens the last draft() returned
    # Bigram positions of `tokens` (context copying only); kept across syncs, cut where they cut.
    index: NgramIndex = field(default_factory=NgramIndex)


def _common_prefix(path: Sequence[int], start: int, tokens: Sequence[int]) -> int:
    """How many of `tokens` equal path[start:] element by element."""
    n = 0
    limit = min(len(tokens), len(path) - start)
    while n < limit and path[start + n] == tokens[n]:
        n += 1
    return n


class ModelDrafter:
    """Drafts with a small causal LM holding a KV slot per session."""

    def __init__(self, runner: ModelRunner, name: str = "model", draft_top_k: int = DEFAULT_DRAFT_TOP_K,
                 idle_ttl_s: float | None = None, confidence_head: torch.nn.Module | None = None,
                 context_copy: ContextCopyRule | None = None) -> None:
        self.runner = runner
        self.name = name
        self.draft_top_k = draft_top_k
        # A trained confidence head (specmesh train-drafter): logits [B, V] -> survival [B] in
        # [0, 1]. Without one, a draft token's confidence is its draft probability.
        self.confidence_head = confidence_head
        self.slots = SessionSlots(runner.cache, idle_ttl_s=idle_ttl_s)
        # Token id of each logit row when the LM head covers a draft vocabulary only; the
        # vocabulary of the input side is then the embedding's.
        ids = getattr(runner.lm_head, "token_ids", None)
        self.draft_token_ids: list[int] | None = [int(i) for i in ids.tolist()] if ids is not None else None
        self.vocab_size: int = (int(runner.model.get_input_embeddings().num_embeddings) if ids is not None
                                else runner.vocab_size)
        self._paths: dict[str, _Path] = {}
        # Counters, for stats and tests: forward passes run, draft tokens answered from a path
        # without a forward (drafted ahead, or kept from an earlier draft).
        self.num_forwards = 0
        self.num_reused_tokens = 0
        # Copy from the context where the model is unsure (None: never); tokens so proposed.
        self.context_copy = context_copy
        self.num_copied_tokens = 0

    @property
    def num_sessions(self) -> int:
        return len(self.slots)

    @property
    def cached_tokens(self) -> int:
        # Free slots have length 0; reading the list is safe while the worker thread drafts.
        return sum(self.runner.cache.lengths)

    @property
    def capacity_tokens(self) -> int:
        return self.runner.cache.num_slots * self.runner.max_tokens

    def ahead_tokens(self, session_id: str) -> tuple[int, ...]:
        """Tokens drafted for the session beyond what the last draft() returned, in order."""
        path = self._paths.get(session_id)
        return tuple(path.tokens[path.sent_length:]) if path is not None else ()

    def release(self, session_ids: Sequence[str]) -> int:
        for sid in session_ids:
            self._paths.pop(sid, None)
        return sum(self.slots.release(sid) for sid in session_ids)

    def _drop_evicted_paths(self) -> None:
        for sid in [sid for sid in self._paths if sid not in self.slots]:
            del self._paths[sid]

    def _draft_limit(self, committed_length: int, num_draft_tokens: int) -> int:
        """Draft tokens that fit the slot after committed_length tokens: a draft at position p
        needs the K/V of positions [0, p), so positions up to max_tokens can be drafted."""
        if num_draft_tokens == 0 or committed_length >= self.runner.max_tokens:
            return 0
        return min(num_draft_tokens, self.runner.max_tokens - committed_length + 1)

    def _sync(self, request: DraftRequest, pinned: Sequence[str]) -> tuple[int, _Path] | None:
        """Bring the session to the request's committed sequence; None is a cache miss.

        The path's first num_cached_tokens tokens are trusted (that is the caller's claim);
        beyond them it is kept as long as it agrees with new_tokens, and its drafts past the
        committed end are kept when they were drawn under the same sampling parameters.
        """
        sid = request.session_id
        known = sid in self.slots and sid in self._paths
        if not known:
            self.release([sid])  # a slot without a path (or the reverse) is not trusted
            if request.num_cached_tokens > 0:
                self.slots.num_cache_misses += 1
                return None
            path, cached = _Path(), 0
        else:
            path, cached = self._paths[sid], self.slots.cached_length(sid)
            if len(path.tokens) < request.num_cached_tokens:
                self.slots.num_cache_misses += 1
                return None
        num_cached, new = request.num_cached_tokens, request.new_tokens
        committed_length = num_cached + len(new)
        agreeing = _common_prefix(path.tokens, num_cached, new)
        index = path.index
        if agreeing < len(new):  # the path left the committed sequence: cut it there
            tokens = path.tokens[: num_cached + agreeing] + list(new[agreeing:])
            valid = num_cached + agreeing  # positions whose cached K/V is still right
            index.truncate(valid)
        else:
            tokens = path.tokens
            valid = len(tokens)
        # Drafts past the committed end survive only if they are ours and drawn the same way.
        keep_drafts = (agreeing == len(new) and path.params == request.params
                       and path.drafts_from <= committed_length <= len(tokens))
        drafts = path.drafts[committed_length - path.drafts_from:] if keep_drafts else []
        if not keep_drafts:
            del tokens[committed_length:]
            valid = min(valid, committed_length)
            index.truncate(committed_length)
        # Keep at least one token unfed: its logits are what the next draft comes from.
        keep_cached = max(0, min(cached, valid, len(tokens) - 1))
        slot = self.slots.sync(sid, keep_cached, pinned=pinned)
        assert slot is not None  # keep_cached <= cached, or a fresh session at 0
        # Updated in place (its index is kept anyway): a new _Path per session and round was host work.
        path.tokens, path.session_id, path.drafts_from, path.drafts = tokens, sid, committed_length, drafts
        path.params, path.sent_length = request.params, committed_length
        self._paths[sid] = path
        return slot, path

    def draft(self, requests: Sequence[DraftRequest]) -> list[DraftChunk]:
        for request in requests:
            validate_request(request, self.vocab_size)
        if len({r.session_id for r in requests}) != len(requests):
            raise InvalidRequestError("a draft batch may hold each session only once")
        self.slots.evict_idle()
        self._drop_evicted_paths()
        batch_ids = [r.session_id for r in requests]
        chunks: dict[int, DraftChunk] = {}
        work: list[tuple[int, _Path, int]] = []  # (slot, path, target length)
        synced: list[tuple[int, DraftRequest, _Path, int]] = []  # (index, request, path, limit)
        for index, request in enumerate(requests):
            committed_length = request.num_cached_tokens + len(request.new_tokens)
            held = self._sync(request, batch_ids)
            if held is None:
                path = self._paths.get(request.session_id)
                # What we do hold: the committed prefix of our last sync.
                holding = min(path.drafts_from, len(path.tokens)) if path is not None else 0
                chunks[index] = DraftChunk(request.session_id, committed_length, cache_miss=True,
                                           num_cached_tokens=holding)
                continue
            slot, path = held
            limit = self._draft_limit(committed_length, request.num_draft_tokens)
            reused = min(limit, len(path.tokens) - committed_length)
            self.num_reused_tokens += reused
            if limit > reused:
                work.append((slot, path, committed_length + limit))
            synced.append((index, request, path, limit))
        self._drop_evicted_paths()  # new sessions may have evicted idle ones
        self._extend(work)
        for index, request, path, limit in synced:
            start = request.num_cached_tokens + len(request.new_tokens)
            drafts = path.drafts[start - path.drafts_from: start - path.drafts_from + limit]
            confidences, distributions = tuple(zip(*drafts)) if drafts else ((), ())
            path.sent_length = start + limit
            chunks[index] = DraftChunk(
                session_id=request.session_id,
                base_length=start,
                tokens=tuple(path.tokens[start:start + limit]),
                confidences=confidences,
                distributions=distributions,
                # The committed tokens and every draft sent: a sync may confirm any of them.
                num_cached_tokens=start + limit,
            )
        return [chunks[i] for i in range(len(requests))]

    def draft_ahead(self, session_ids: Sequence[str], num_tokens: int) -> dict[str, int]:
        """Extend each session's drafted path by up to num_tokens tokens, in one batch, without
        a request: what a later draft() of the same sequence would draft, drafted early.

        Unknown sessions and sessions at the slot's end are skipped. Returns tokens added per
        session. It does not refresh a session's idle time: only the scheduler's syncs do.
        """
        self._drop_evicted_paths()
        work = []
        started: dict[str, int] = {}  # session -> path length before
        for sid in dict.fromkeys(session_ids):
            path = self._paths.get(sid)
            if path is None or path.params is None or not path.tokens or num_tokens <= 0:
                continue
            target = min(len(path.tokens) + num_tokens, self.runner.max_tokens + 1)
            if target > len(path.tokens):
                work.append((self.slots.slot_of(sid), path, target))
                started[sid] = len(path.tokens)
        self._extend(work)
        return {sid: len(self._paths[sid].tokens) - length for sid, length in started.items()}

    def _extend(self, work: Sequence[tuple[int, _Path, int]]) -> None:
        """Draft until every path reaches its target length: one batched forward per step,
        each session feeding its unfed tokens and drafting from the logits of the last."""
        lengths = self.runner.cache.lengths
        running = [item for item in work if len(item[1].tokens) < item[2]]
        while running:
            self.num_forwards += 1
            requests = []
            paths = []
            for slot, path, _ in running:
                tokens, cached = path.tokens, lengths[slot]
                requests.append(ForwardRequest(slot, tokens[cached:], len(tokens) - cached - 1))
                paths.append(path)
            # [len(running), V]: one row per session, the logits after its last token
            logits, _ = self.runner.forward_flat(requests)
            picks = self._pick(logits, paths)
            if self.confidence_head is not None:
                picks = self._with_head_confidence(logits, picks)
            if self.context_copy is not None:
                picks = self._with_context_copies(logits, paths, picks)
            for path, (token, confidence, q) in zip(paths, picks):
                path.tokens.append(token)
                path.drafts.append((confidence, q))
            running = [item for item in running if len(item[1].tokens) < item[2]]

    def _pick(self, logits: torch.Tensor, paths: Sequence[_Path]) -> list[tuple[int, float, SparseDistribution]]:
        """The next draft token of each path, with its confidence and q. logits: [B, V], row b
        predicts the token at position len(paths[b].tokens). Greedy rows are decided together
        (one transfer for the batch); sampled rows draw with their position's uniform."""
        ids = self.draft_token_ids  # draft-vocabulary row -> token id (None: rows are token ids)
        greedy = [b for b, path in enumerate(paths) if path.params is not None and path.params.greedy]
        picks: list[tuple[int, float, SparseDistribution] | None] = [None] * len(paths)
        if greedy:
            every_row = len(greedy) == len(paths)  # the common case: no row selection
            tokens, confidences = greedy_tokens(logits if every_row else logits[greedy])
            if ids is not None:
                tokens = [ids[token] for token in tokens]
            greedy_picks = [(token, confidence, point_mass(token)) for token, confidence in zip(tokens, confidences)]
            if every_row:
                return greedy_picks
            for b, pick in zip(greedy, greedy_picks):
                picks[b] = pick
        for b, path in enumerate(paths):
            if picks[b] is None:
                params = path.params
                assert params is not None
                uniform = draft_uniform(params.seed or 0, len(path.tokens))
                token, confidence, q = draft_distribution(logits[b], params, self.draft_top_k, uniform)
                if ids is not None:
                    token, q = ids[token], SparseDistribution(tuple([ids[i] for i in q.token_ids]), q.probs)
                picks[b] = (token, confidence, q)
        return picks  # type: ignore[return-value]

    def _with_context_copies(self, logits: torch.Tensor, paths: Sequence[_Path],
                             picks: list[tuple[int, float, SparseDistribution]]) -> list[tuple[int, float, SparseDistribution]]:
        """picks, with the context's continuation in place of the model's token wherever the rule
        (drafter/context_copy.py) says so. Decided from the tokens and the logits only."""
        rule = self.context_copy
        assert rule is not None
        found: dict[int, tuple[int, int]] = {}  # row -> (token, match length)
        for b, path in enumerate(paths):
            match = rule.match(path.index, path.tokens)
            if match is not None:
                found[b] = match
        if not found:
            return picks
        # The model's top probability at temperature 1, whatever the request's temperature:
        # the same logits give the same decision in greedy and sampled drafting.
        rows = list(found)
        top = logits[rows].float().softmax(dim=-1).amax(dim=-1).tolist()
        picks = list(picks)
        for b, probability in zip(rows, top):
            if rule.copies(probability):
                token, ngram = found[b]
                picks[b] = (token, rule.confidence(ngram), point_mass(token))
                self.num_copied_tokens += 1
        return picks

    @torch.inference_mode()
    def _with_head_confidence(self, logits: torch.Tensor, picks: list[tuple[int, float, SparseDistribution]]
                              ) -> list[tuple[int, float, SparseDistribution]]:
        """picks with each confidence replaced by the confidence head's survival estimate (one
        batched call). logits: [B, V], row b belongs to picks[b]."""
        assert self.confidence_head is not None
        confidences = self.confidence_head(logits).tolist()
        return [(token, float(c), q) for (token, _, q), c in zip(picks, confidences)]
