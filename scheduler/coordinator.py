"""The scheduler's core: admits sessions, pins each to a verifier replica (one speculation loop
per verifier, so every round is one batched Verify per replica), routes drafts through the
drafter pool, and moves sessions when a replica disappears. No gRPC server code here.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Callable

from scheduler.backends import BackendUnavailable
from scheduler.draft_policy import DraftLengthPolicy
from scheduler.drafter_router import DrafterRouter
from scheduler.replica_pool import ReplicaPool
from scheduler.round_tracing import end_session_span, start_session_span
from scheduler.session import Commit, Session
from scheduler.speculation_loop import SessionEntry, SpeculationLoop, drain
from specmesh.errors import InvalidRequestError, TokenizerMismatchError
from specmesh.grpc_errors import NoBackendError
from specmesh.metrics import SCHEDULER_ACTIVE_SESSIONS, SCHEDULER_FAILOVERS

log = logging.getLogger(__name__)


class Coordinator:
    def __init__(self, verifiers: ReplicaPool, drafters: DrafterRouter | None,
                 policy: DraftLengthPolicy | Callable[[str, str], DraftLengthPolicy],
                 max_batch_sessions: int = 64, max_tokens_limit: int = 4096, cost_registry=None,
                 lanes: int = 1, lane_min_sessions: int = 8) -> None:
        """policy: a policy, or a factory called with (verifier model, drafter model) once they
        are known. cost_registry: where verifier cost profiles are published (CostProfileRegistry)."""
        self.verifiers = verifiers
        self.drafters = drafters
        self._policy_factory = policy if callable(policy) and not hasattr(policy, "draft_lengths") else None
        self.policy: DraftLengthPolicy | None = None if self._policy_factory else policy
        self.cost_registry = cost_registry
        self.verifier_model = ""
        self.drafter_model = ""
        self.max_batch_sessions = max_batch_sessions
        self.lanes = lanes
        self.lane_min_sessions = lane_min_sessions
        self.max_tokens_limit = max_tokens_limit
        self.prompt_lengths: dict[str, int] = {}  # shared with remote clients
        self.context_limit: int | None = None
        self.vocab_size: int | None = None
        self.tokenizer_fingerprint: str | None = None
        self._loops: dict[str, SpeculationLoop] = {}
        self._home: dict[str, str] = {}  # session id -> verifier endpoint
        self._retired: set[SpeculationLoop] = set()  # loops of verifiers that discovery removed
        self._background: set[asyncio.Task] = set()
        self.num_verifier_failovers = 0

    # ---- start-up ---------------------------------------------------------------------------
    async def connect(self, wait_s: float = 60.0) -> None:
        """Learn context limit, vocabulary and tokenizer from the verifiers; check drafters.

        Waits up to wait_s for at least one verifier. Drafters with another tokenizer are
        refused with a clear error (TokenizerMismatchError) while they are the only ones.
        """
        deadline = asyncio.get_running_loop().time() + wait_s
        profiles = {}
        while not profiles:
            for endpoint in self.verifiers.source.endpoints():
                try:
                    profiles[endpoint] = await self.verifiers.client(endpoint).profile()
                except BackendUnavailable as error:
                    log.info("verifier %s not ready: %s", endpoint, error)
            if not profiles:
                if asyncio.get_running_loop().time() > deadline:
                    raise NoBackendError(f"no verifier reachable among {self.verifiers.source.endpoints()}")
                await asyncio.sleep(0.5)
        fingerprints = {p.tokenizer_fingerprint for p in profiles.values()}
        if len(fingerprints) > 1:
            raise TokenizerMismatchError(f"verifiers disagree on the tokenizer: {sorted(fingerprints)}")
        self.tokenizer_fingerprint = fingerprints.pop()
        self.context_limit = min(p.max_context_tokens for p in profiles.values())
        self.vocab_size = min(p.vocab_size for p in profiles.values())
        self.verifier_model = next(iter(profiles.values())).model_name
        if self.cost_registry is not None:
            from scheduler.cost_model import CostProfile

            for endpoint, profile in profiles.items():
                if profile.cost_table:
                    self.cost_registry.set_local(endpoint, CostProfile.from_table(
                        (p.batch_tokens, p.forward_seconds) for p in profile.cost_table))
        if self.drafters is not None:
            await self.check_drafters()
        if self._policy_factory is not None:
            self.policy = self._policy_factory(self.verifier_model, self.drafter_model or "none")

    async def check_drafters(self) -> None:
        pool = self.drafters.pool
        mismatched = []
        for endpoint in pool.source.endpoints():
            try:
                profile = await pool.client(endpoint).profile()
            except BackendUnavailable as error:
                log.warning("drafter %s not reachable yet: %s", endpoint, error)
                continue
            self.drafter_model = self.drafter_model or profile.model_name
            if profile.tokenizer_fingerprint and profile.tokenizer_fingerprint != self.tokenizer_fingerprint:
                pool.reject(endpoint)
                mismatched.append(f"{endpoint} ({profile.model_name})")
        if mismatched:
            raise TokenizerMismatchError(
                "drafter and verifier must share a tokenizer; these drafters use another one: " + ", ".join(mismatched))

    # ---- sessions ----------------------------------------------------------------------------
    def validate(self, session: Session) -> None:
        if not session.prompt_tokens:
            raise InvalidRequestError("prompt must not be empty")
        if session.max_tokens <= 0 or session.max_tokens > self.max_tokens_limit:
            raise InvalidRequestError(f"max_tokens must be in [1, {self.max_tokens_limit}], got {session.max_tokens}")
        if self.vocab_size is not None and any(not 0 <= t < self.vocab_size for t in session.prompt_tokens):
            raise InvalidRequestError(f"prompt token ids must lie in [0, {self.vocab_size})")
        if self.context_limit is not None and len(session.prompt_tokens) + session.max_tokens > self.context_limit:
            raise InvalidRequestError(
                f"prompt ({len(session.prompt_tokens)} tokens) + max_tokens ({session.max_tokens}) exceeds the "
                f"model's context of {self.context_limit} tokens")
        session.params.validate()

    @property
    def num_sessions(self) -> int:
        return len(self._home)

    def _load(self, endpoint: str) -> int:
        loop = self._loops.get(endpoint)
        return loop.num_sessions if loop is not None else 0

    def _loop_for(self, endpoint: str) -> SpeculationLoop:
        if endpoint not in self._loops:
            # Each verifier has its own cost curve, so the adaptive policy is per replica.
            policy = self.policy.for_verifier(endpoint) if hasattr(self.policy, "for_verifier") else self.policy
            self._loops[endpoint] = SpeculationLoop(
                self.verifiers.client(endpoint), self.drafters, policy,
                context_limit=self.context_limit or 1 << 30, max_batch_sessions=self.max_batch_sessions,
                on_verifier_lost=self._verifier_lost, lanes=self.lanes, lane_min_sessions=self.lane_min_sessions,
            )
        return self._loops[endpoint]

    def _place(self, entry: SessionEntry, exclude: set[str] = frozenset()) -> bool:
        endpoint = self.verifiers.pick_least_loaded(self._load, exclude)
        if endpoint is None:
            return False
        self._home[entry.session.session_id] = endpoint
        self._loop_for(endpoint).adopt(entry)
        return True

    def _verifier_lost(self, loop: SpeculationLoop, entries: list[SessionEntry], error: BackendUnavailable) -> None:
        endpoint = error.endpoint
        log.warning("verifier %s lost (%s); moving %d sessions", endpoint, error, len(entries))
        if isinstance(error, EndpointWithdrawn):
            self._retire(loop, entries)  # out of the pool already: no cooldown needed
        else:
            self.verifiers.mark_failed(endpoint)
        if self._loops.get(endpoint) is loop:
            del self._loops[endpoint]
        for entry in entries:
            # The new verifier holds nothing: re-prefill from the committed tokens.
            entry.session.verifier_cached = 0
            if self._place(entry, exclude={endpoint}):
                self.num_verifier_failovers += 1
                SCHEDULER_FAILOVERS.labels(backend="verifier").inc()
            else:
                self._home.pop(entry.session.session_id, None)
                entry.session.cancel()
                entry.outbox.put_nowait(NoBackendError("no verifier is reachable"))

    async def stream(self, session: Session) -> AsyncIterator[Commit]:
        """Run a session to completion. Closing the iterator early cancels it everywhere."""
        self.validate(session)
        # The session span parents every round span: set before the session joins a loop.
        entry = SessionEntry(session, span=start_session_span(session))
        self.prompt_lengths[session.session_id] = len(session.prompt_tokens)
        if not self._place(entry):
            self.prompt_lengths.pop(session.session_id, None)
            end_session_span(entry.span, session, NoBackendError("no verifier is reachable"))
            raise NoBackendError("no verifier is reachable")
        SCHEDULER_ACTIVE_SESSIONS.inc()
        error: BaseException | None = None
        try:
            async for commit in drain(entry):
                yield commit
        except BaseException as caught:
            error = caught
            raise
        finally:
            SCHEDULER_ACTIVE_SESSIONS.dec()
            if not session.finished:
                session.cancel()
            if entry.span is not None:
                entry.span.set_attribute("specmesh.verifier.endpoint", self._home.get(session.session_id, ""))
                end_session_span(entry.span, session, error)
            home = self._home.pop(session.session_id, None)
            if home in self._loops:
                self._loops[home].wake()
            self.prompt_lengths.pop(session.session_id, None)

    async def close(self) -> None:
        for loop in [*self._loops.values(), *self._retired]:
            await loop.close()
        for endpoint, client in self.verifiers.clients().items():
            await client.close()
        if self.drafters is not None:
            for client in self.drafters.pool.clients().values():
                await client.close()
        for resource in (getattr(self.policy, "calibration", None), self.cost_registry):
            if resource is not None and hasattr(resource, "close"):
                await resource.close()

    # ---- discovery (scheduler/discovery.py) ---------------------------------------------------
    def endpoints_changed(self) -> None:
        """The verifier pool changed. A verifier that left has its sessions moved now, by the same
        path as a verifier that failed: its loop finishes the round in flight, then its next Verify
        raises EndpointWithdrawn and _verifier_lost re-homes every session (re-prefill elsewhere).
        A newcomer needs nothing here: placement reads the pool for every new session."""
        present = set(self.verifiers.source.endpoints())
        for endpoint, loop in list(self._loops.items()):
            if endpoint in present:
                continue
            del self._loops[endpoint]
            self._retired.add(loop)
            loop.verifier = WithdrawnVerifier(loop.verifier, endpoint)
            if loop.num_sessions:
                log.info("verifier %s left the pool; moving its %d sessions", endpoint, loop.num_sessions)
                loop.wake()
            else:
                self._retire(loop, [])

    def _retire(self, loop: SpeculationLoop, moved: list[SessionEntry]) -> None:
        """Stop a withdrawn verifier's loop and free the moved sessions' slots there (the pod may
        well be alive, only not ready), in the background."""
        async def retire() -> None:
            try:
                await loop.close()
                if moved:
                    await loop.verifier.release([entry.session.session_id for entry in moved])
            except Exception:  # noqa: BLE001 - best effort: the verifier evicts idle sessions itself
                pass
            finally:
                self._retired.discard(loop)

        task = asyncio.get_running_loop().create_task(retire())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class EndpointWithdrawn(BackendUnavailable):
    """Discovery removed this verifier from the pool (scaled down, not ready, replaced)."""


class WithdrawnVerifier:
    """Takes a withdrawn verifier's place in its loop: the next Verify raises EndpointWithdrawn,
    which moves the loop's sessions; Release still reaches the pod."""

    def __init__(self, client, endpoint: str) -> None:
        self.client = client
        self.endpoint = endpoint

    async def verify(self, items):
        raise EndpointWithdrawn(self.endpoint, "left the pool (discovery)")

    async def release(self, session_ids) -> None:
        await self.client.release(session_ids)
