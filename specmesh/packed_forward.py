"""The runner's packed path: a ragged batch as one flat sequence, attention over slot rows.

Everything one forward reads from the host goes to the device as ONE int64 array (one copy,
asynchronous from pinned memory):

    [input ids | positions | write slots | write positions | grid rows | grid columns |
     logit token indices]      each `tokens` long, then
    [row cached lengths | row query lengths]      each `rows` long

Padding tokens (up to a bucket's size) write their K/V to the scratch slot and sit in the
garbage column of the query grid; slot rows without a request have query length 0. The mask is
built on the device from the row lengths, so a captured CUDA graph replays any batch of its
shape bucket: decode-shaped forwards become one graph launch (specmesh/cuda_graphs.py).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from specmesh import slot_attention
from specmesh.cuda_graphs import MAX_GRAPH_Q, GraphCache, GraphKey, pow2_at_least, token_bucket

if TYPE_CHECKING:
    from specmesh.model_runner import ForwardRequest, ModelRunner

log = logging.getLogger(__name__)

# Query grid width of graphed forwards: fixed per bucket so a few graphs serve every mix of
# draft lengths (the attention over a wider grid costs next to nothing in decode).
GRAPH_Q_BUCKET = 16
MIN_GRAPH_READ_LENGTH = 128


class PackedForward:
    def __init__(self, runner: "ModelRunner", kv_group: int, *, cuda_graphs: bool) -> None:
        self.runner = runner
        self.kv_group = kv_group
        self.graphs: GraphCache | None = None
        if cuda_graphs:
            self.graphs = GraphCache(self._graph_step, self._dummy_inputs, runner.vocab_size, runner.dtype,
                                     runner.device)
        self.num_graph_forwards = 0
        self.num_eager_forwards = 0
        self._eager_shapes_seen: set[GraphKey] = set()
        # Half precision on CPU: every token's result is made independent of what shares its
        # forward, bit for bit, so that verifying drafts commits exactly what decoding alone
        # would. float32 rounding hides the difference; bfloat16 does not (2-5% of SmolLM2's
        # greedy tokens flipped between a forward of 1 token and one of 5). Linear layers and
        # the LM head never see a single row (eager_key, ModelRunner.head_logits), and
        # attention runs one query at a time over exactly the keys it may see (the CPU kernel's
        # result for a query depends on the key length and the other queries of the call).
        self.batch_invariant = runner.device.type == "cpu" and runner.dtype != torch.float32

    # ---- inputs ---------------------------------------------------------------------------
    def host_inputs(self, requests: Sequence["ForwardRequest"], cached: Sequence[int], lengths: Sequence[int],
                    key: GraphKey) -> np.ndarray:
        n, rows = key.tokens, key.rows
        out = np.zeros(key.input_size, dtype=np.int64)
        out[2 * n: 3 * n] = self.runner.cache.scratch_slot
        out[5 * n: 6 * n] = key.q_len - 1
        if len(requests) >= 8 and len(requests) == sum(lengths):
            return self._decode_inputs(out, requests, cached, key)
        return self._ragged_inputs(out, requests, cached, lengths, key)

    @staticmethod
    def _ragged_inputs(out: np.ndarray, requests: Sequence["ForwardRequest"], cached: Sequence[int],
                       lengths: Sequence[int], key: GraphKey) -> np.ndarray:
        """host_inputs for any batch, request by request."""
        n, rows = key.tokens, key.rows
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        columns: list[int] = []
        logit_rows: list[int] = []
        row_cached = out[7 * n: 7 * n + rows]
        row_q = out[7 * n + rows: 7 * n + 2 * rows]
        offset = 0
        for r, c, length in zip(requests, cached, lengths):
            ids.extend(r.tokens)
            positions.extend(range(c, c + length))
            slots.extend([r.slot] * length)
            columns.extend(range(length))
            logit_rows.extend(range(offset + r.logits_from, offset + length))
            row_cached[r.slot] = c
            row_q[r.slot] = length
            offset += length
        out[0:offset] = ids
        out[n: n + offset] = positions
        out[2 * n: 2 * n + offset] = slots
        out[3 * n: 3 * n + offset] = positions
        out[4 * n: 4 * n + offset] = slots
        out[5 * n: 5 * n + offset] = columns
        out[6 * n: 6 * n + len(logit_rows)] = logit_rows
        return out

    @staticmethod
    def _decode_inputs(out: np.ndarray, requests: Sequence["ForwardRequest"], cached: Sequence[int],
                       key: GraphKey) -> np.ndarray:
        """host_inputs for one token per request (a decode step), filled with a few array
        writes instead of list work per request: what _ragged_inputs writes, value for value
        (tests/test_packed_host_inputs.py)."""
        n, rows, count = key.tokens, key.rows, len(requests)
        slots = np.fromiter([r.slot for r in requests], np.int64, count)
        positions = np.array(cached, dtype=np.int64)
        out[0:count] = [r.tokens[0] for r in requests]
        out[n: n + count] = positions
        out[2 * n: 2 * n + count] = slots
        out[3 * n: 3 * n + count] = positions
        out[4 * n: 4 * n + count] = slots
        out[5 * n: 5 * n + count] = 0
        logit_rows = [i for i, r in enumerate(requests) if r.logits_from == 0]  # logits_from is 0 or 1
        out[6 * n: 6 * n + len(logit_rows)] = logit_rows
        out[7 * n + slots] = positions
        out[7 * n + rows + slots] = 1
        return out

    def _dummy_inputs(self, key: GraphKey) -> torch.Tensor:
        """All padding (touches no session): what graphs are warmed up and captured with."""
        return torch.from_numpy(self.host_inputs([], [], [], key)).to(self.runner.device)

    # ---- the forward ----------------------------------------------------------------------
    def run(self, inputs: torch.Tensor, key: GraphKey) -> torch.Tensor:
        """The decoder over device `inputs` laid out for `key`; returns hidden states [N, H]."""
        runner = self.runner
        n, rows = key.tokens, key.rows
        field = lambda i: inputs[i * n: (i + 1) * n]  # noqa: E731
        row_cached = inputs[7 * n: 7 * n + rows]
        row_q = inputs[7 * n + rows: 7 * n + 2 * rows]
        mask = slot_attention.build_packed_mask(row_cached, row_q, key.q_len, key.read_length, self.kv_group,
                                                runner.dtype)
        runner.cache.begin_packed_forward(field(2).view(1, n), field(3).view(1, n), rows, key.read_length)
        try:
            batch = slot_attention.PackedBatch(field(4), field(5), rows, key.q_len,
                                               row_cached=row_cached if self.batch_invariant else None)
            with slot_attention.active_batch(batch):
                out = runner.decoder(
                    input_ids=field(0).view(1, n),
                    attention_mask=mask,
                    position_ids=field(1).view(1, n),
                    use_cache=True,
                    **{runner._cache_argument: runner.cache},
                )
        finally:
            runner.cache.end_forward([], [])  # lengths are the caller's to set
        return out.last_hidden_state[0]

    def _graph_step(self, inputs: torch.Tensor, key: GraphKey, logits_out: torch.Tensor) -> None:
        """What a graph captures: the forward and the LM head of every token row, written into
        the shared logits buffer [N, V]."""
        hidden = self.run(inputs, key)
        head = self.runner.lm_head
        torch.mm(hidden, head.weight.t(), out=logits_out)
        if getattr(head, "bias", None) is not None:
            logits_out.add_(head.bias)
        softcap = self.runner._softcap
        if softcap:
            logits_out.div_(softcap).tanh_().mul_(softcap)

    def graph_key(self, num_tokens: int, highest_slot: int, q_max: int, read_length: int) -> GraphKey | None:
        if self.graphs is None or q_max > MAX_GRAPH_Q:
            return None
        cache = self.runner.cache
        key = GraphKey(token_bucket(num_tokens), min(pow2_at_least(highest_slot + 1), cache.num_slots),
                       pow2_at_least(q_max, GRAPH_Q_BUCKET) + 1,
                       min(pow2_at_least(read_length, MIN_GRAPH_READ_LENGTH), cache.max_tokens))
        return key if self.graphs.fits(key) else None

    def eager_key(self, num_tokens: int, highest_slot: int, q_max: int, read_length: int) -> GraphKey:
        """The layout of an eager forward. On CUDA its shapes are rounded up too (padding tokens
        cost little next to a prefill): a new shape costs kernel selection and allocator growth
        (~75 ms seen for an 8B prefill), and prompts come in every length."""
        if self.runner.device.type != "cuda":
            if self.batch_invariant:
                # A single token runs as two: one row takes the matrix-vector kernel and two or
                # more the matrix kernel, which round differently (see batch_invariant).
                return GraphKey(max(num_tokens, 2), highest_slot + 1, q_max + 1, read_length)
            return GraphKey(num_tokens, highest_slot + 1, q_max + 1, read_length)
        cache = self.runner.cache
        tokens = token_bucket(num_tokens) if num_tokens <= 1024 else -(-num_tokens // 256) * 256
        return GraphKey(tokens, min(pow2_at_least(highest_slot + 1), cache.num_slots), pow2_at_least(q_max) + 1,
                        min(pow2_at_least(read_length, MIN_GRAPH_READ_LENGTH), cache.max_tokens))

    def forward(self, requests: Sequence["ForwardRequest"], cached: list[int], lengths: list[int],
                num_logits: int) -> torch.Tensor:
        """Logits [num_logits, V] float32 for the requested rows, request after request."""
        runner = self.runner
        total, q_max = sum(lengths), max(lengths)
        highest = max(r.slot for r in requests)
        read_length = max(c + n for c, n in zip(cached, lengths))
        on_cuda = runner.device.type == "cuda"
        key = self.graph_key(total, highest, q_max, read_length)
        if key is not None:
            host = torch.from_numpy(self.host_inputs(requests, cached, lengths, key))
            if self.graphs.replay(key, host.pin_memory() if on_cuda else host):
                self.num_graph_forwards += 1
                rows = self.graphs.inputs[6 * key.tokens: 6 * key.tokens + num_logits]
                # A copy: the shared buffer belongs to the next replay.
                return self.graphs.logits.index_select(0, rows).float()
        self.num_eager_forwards += 1
        key = self.eager_key(total, highest, q_max, read_length)
        # The first forward of an eager shape pays kernel selection and allocator growth (tens
        # of ms on an 8B model); timed once per shape (two syncs) so that such stalls in a
        # running service show in its log.
        first = on_cuda and key not in self._eager_shapes_seen
        if first:
            torch.cuda.synchronize(runner.device)
            started = time.perf_counter()
        host = torch.from_numpy(self.host_inputs(requests, cached, lengths, key))
        inputs = host.pin_memory().to(runner.device, non_blocking=True) if on_cuda else host
        hidden = self.run(inputs, key).index_select(0, inputs[6 * key.tokens: 6 * key.tokens + num_logits])
        logits = runner.head_logits(hidden)
        if first:
            torch.cuda.synchronize(runner.device)
            self._eager_shapes_seen.add(key)
            log.info("first eager forward of %s (%d tokens, %d sessions): %.1f ms", key, total, len(requests),
                     1e3 * (time.perf_counter() - started))
        return logits

    def capture(self, shapes: Sequence[tuple[int, int]], read_lengths: Sequence[int]) -> int:
        """Capture now (start-up) the graphs for these (flat tokens, sessions) shapes and read
        lengths, so that the first requests of a shape do not pay for it. Sessions are assumed
        to sit in the lowest slots. Returns how many graphs exist."""
        if self.graphs is None:
            return 0
        keys = {self.graph_key(n, sessions - 1, 1, length) for n, sessions in shapes for length in read_lengths
                if n >= 1 and sessions >= 1}
        with torch.inference_mode():
            for key in sorted(k for k in keys if k is not None):
                self.graphs.get(key)
        return len(self.graphs)
