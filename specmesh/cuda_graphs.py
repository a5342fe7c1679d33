"""CUDA graphs for the runner's decode-shaped forwards (a few tokens per session).

A small-batch forward of a transformer is launch-bound: hundreds of kernels of a few
microseconds each, with Python between them. Captured once per shape bucket and replayed, the
whole forward (mask, every layer, LM head) is one launch.

Shapes are bucketed so that few graphs serve every batch: the flat token count N (padded with
tokens that write to the scratch slot), the slot rows attention reads (a power of two covering
the highest live slot), the query grid width and the read length. All graphs share one memory
pool, one int64 input buffer and one logits buffer: they replay one at a time on one stream
and the caller copies what it needs out of the logits buffer before the next replay.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger(__name__)

# Graphs serve forwards of at most this many tokens with at most MAX_GRAPH_Q per session;
# larger ones (prefill) run eagerly, where launch overhead is amortised anyway.
MAX_GRAPH_TOKENS = 1024
MAX_GRAPH_Q = 32
MAX_GRAPHS = 256


def token_bucket(n: int) -> int:
    """Padded flat token count: powers of two up to 64, then steps of 64, then 128."""
    if n <= 64:
        return 1 << max(0, (n - 1).bit_length())
    if n <= 512:
        return -(-n // 64) * 64
    return -(-n // 128) * 128


def pow2_at_least(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


@dataclass(frozen=True, order=True)
class GraphKey:
    tokens: int  # N: flat tokens, padded
    rows: int  # slot rows attention reads
    q_len: int  # query grid width (including the garbage column)
    read_length: int  # cached positions attention reads

    @property
    def input_size(self) -> int:
        return 7 * self.tokens + 2 * self.rows


@contextlib.contextmanager
def garbage_collection_paused() -> Iterator[None]:
    """Python's cyclic collector off for the block, as it was after.

    A collection inside a capture can free a dead CUDAGraph (one dropped by clear() but still
    in a reference cycle); its destructor's cudaGraphExecDestroy is not permitted while this
    thread captures, and it invalidates the capture (seen on the H200 as
    CUBLAS_STATUS_EXECUTION_FAILED in the next GEMM, after which every shape ran eagerly).
    torch no longer collects before a capture (torch.compiler.config.force_cudagraph_gc), so
    the garbage waits until the capture is over instead."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _EagerGraph:
    def __init__(self, step: Callable[[], None]) -> None:
        self.replay = step


class GraphCache:
    """Captured graphs by shape. `step(inputs, key, logits_out)` is the eager forward that the
    graph captures: it reads everything from `inputs` (a view of the shared input buffer) and
    writes logits for all key.tokens rows into `logits_out`."""

    def __init__(self, step: Callable[[torch.Tensor, GraphKey, torch.Tensor], None], dummy_inputs: Callable[[GraphKey], torch.Tensor],
                 vocab_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self._step = step
        self._dummy_inputs = dummy_inputs
        self.device = device
        self.inputs = torch.zeros(7 * MAX_GRAPH_TOKENS + 2 * 4096, dtype=torch.long, device=device)
        self.logits = torch.empty((MAX_GRAPH_TOKENS, vocab_size), dtype=dtype, device=device)
        # Off CUDA (tests) a "graph" runs the same step eagerly on the same shared buffers.
        self.emulated = device.type != "cuda"
        self._pool = None if self.emulated else torch.cuda.graph_pool_handle()
        self._graphs: dict[GraphKey, torch.cuda.CUDAGraph | _EagerGraph] = {}
        self.disabled = False
        self.capture_seconds = 0.0

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Drop every graph (after the model's modules changed: graphs replay what they captured)."""
        self._graphs.clear()
        if not self.emulated:
            # The old pool dies with its last graph; capturing into its handle again would fail.
            self._pool = torch.cuda.graph_pool_handle()

    def fits(self, key: GraphKey) -> bool:
        return key.tokens <= MAX_GRAPH_TOKENS and key.input_size <= self.inputs.numel()

    def get(self, key: GraphKey) -> torch.cuda.CUDAGraph | None:
        graph = self._graphs.get(key)
        if graph is not None or self.disabled or len(self._graphs) >= MAX_GRAPHS:
            return graph
        start = time.perf_counter()
        try:
            graph = self._capture(key)
        except Exception:  # noqa: BLE001 - an uncapturable model still runs, eagerly
            log.exception("CUDA graph capture failed for %s; running eagerly from now on", key)
            self.disabled = True
            if not self.emulated:
                torch.cuda.synchronize(self.device)
            return None
        self.capture_seconds += time.perf_counter() - start
        self._graphs[key] = graph
        log.debug("captured CUDA graph %s in %.0f ms", key, 1000 * (time.perf_counter() - start))
        return graph

    def _capture(self, key: GraphKey) -> torch.cuda.CUDAGraph | _EagerGraph:
        inputs = self.inputs[: key.input_size]
        if self.emulated:
            return _EagerGraph(lambda: self._step(inputs, key, self.logits[: key.tokens]))
        inputs.copy_(self._dummy_inputs(key))  # padding only: writes go to the scratch slot
        logits = self.logits[: key.tokens]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._step(inputs, key, logits)  # warm-up: workspaces, kernel selection
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other services' threads keep running forwards while this one captures.
        # A capture stream of this runner's device: torch's default one is created once, on
        # whichever device was current, and a drafter and a verifier may share a process on two
        # GPUs.
        with garbage_collection_paused(), torch.cuda.graph(graph, pool=self._pool, stream=side,
                                                           capture_error_mode="thread_local"):
            self._step(inputs, key, logits)
        return graph

    def replay(self, key: GraphKey, host_inputs: torch.Tensor) -> bool:
        """Copy host_inputs ([key.input_size] long, pinned) in and replay; False if no graph."""
        graph = self.get(key)
        if graph is None:
            return False
        self.inputs[: key.input_size].copy_(host_inputs, non_blocking=True)
        graph.replay()
        return True
