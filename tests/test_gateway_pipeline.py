"""The gateway's gRPC-free core: stop strings over deltas, incremental detokenization of text
that splits inside UTF-8 characters, request validation, and the request pipeline against a
scripted scheduler backend."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.generation import GenerationPipeline, SchedulerStreamError
from gateway.records import ChatMessage, CommittedTokens, GenerationRequest, TokenizedRequest
from gateway.stop_strings import StopStringMatcher
from gateway.validation import RequestLimits, validate_prompt_length, validate_request
from specmesh.detokenize import IncrementalDetokenizer
from specmesh.errors import InvalidRequestError
from specmesh.records import SpeculationStats
from tests.byte_tokenizer import make_byte_tokenizer

MULTIBYTE_TEXT = "hello é 日本語 🙂 naïve — ünïcödé hello 👩‍👩‍👧 end"


@pytest.fixture(scope="module")
def byte_tokenizer():
    return make_byte_tokenizer()


# ---------------------------------------------------------------------------- stop strings


def reference_cut(text: str, stops: list[str]) -> tuple[str, str | None]:
    """What a reader going character by character sees: the first stop string to complete."""
    for end in range(1, len(text) + 1):
        for stop in sorted(stops, key=len, reverse=True):  # same end: the earliest start
            if stop and text[:end].endswith(stop):
                return text[: end - len(stop)], stop
    return text, None


def feed_all(stops: list[str], pieces: list[str]) -> tuple[str, str | None]:
    matcher = StopStringMatcher(stops)
    out = "".join(matcher.feed(p) for p in pieces)
    return out + matcher.flush(), matcher.matched


def random_split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randrange(0, 6))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def test_stop_string_split_across_deltas_is_cut_and_not_emitted():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("abc ST") == "abc "  # "ST" may start the stop string: held back
    assert matcher.held_back == "ST"
    assert matcher.feed("O") == ""
    assert matcher.feed("P and more") == ""
    assert matcher.matched == "STOP"
    assert matcher.feed("later") == "" and matcher.flush() == ""


def test_held_back_text_is_released_when_it_cannot_be_a_stop_string():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("xx ST") == "xx "
    assert matcher.feed("ART") == "START"
    assert matcher.feed("S") == ""
    assert matcher.flush() == "S"
    assert matcher.matched is None


def test_first_completed_stop_string_wins():
    assert feed_all(["abcd", "bc"], ["a", "b", "c", "d"]) == ("a", "bc")
    assert feed_all(["abcd", "bc"], ["abcd"]) == ("a", "bc")  # same answer in one delta
    assert feed_all(["b", "ab"], ["xab"]) == ("x", "ab")  # same end: the earlier start


def test_multibyte_stop_strings_and_text():
    assert feed_all(["日本"], ["naïve 日", "本語"]) == ("naïve ", "日本")
    assert feed_all(["🙂"], ["a🙂b"]) == ("a", "🙂")
    assert feed_all(["éx"], ["é", "é", "y"]) == ("ééy", None)


def test_no_stop_strings_passes_text_through():
    matcher = StopStringMatcher([])
    assert matcher.feed("anything") == "anything" and matcher.flush() == ""


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab日🙂 ", max_size=30),
       stops=st.lists(st.text(alphabet="ab日🙂 ", min_size=1, max_size=4), min_size=1, max_size=3),
       seed=st.integers(0, 2**32 - 1))
def test_any_split_gives_the_character_by_character_answer(text, stops, seed):
    assert feed_all(stops, random_split(text, random.Random(seed))) == reference_cut(text, stops)


# ---------------------------------------------------------------------------- detokenizer


@pytest.mark.parametrize("seed", range(5))
def test_incremental_detokenizer_never_splits_a_character(byte_tokenizer, seed):
    ids = byte_tokenizer(MULTIBYTE_TEXT, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in byte_tokenizer.decode([i]) for i in ids)  # the case is real
    rng = random.Random(seed)
    detokenizer = IncrementalDetokenizer(byte_tokenizer)
    deltas, i = [], 0
    while i < len(ids):
        n = 1 if seed == 0 else rng.randrange(1, 4)
        deltas.append(detokenizer.add(ids[i:i + n]))
        i += n
    deltas.append(detokenizer.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == MULTIBYTE_TEXT


# ---------------------------------------------------------------------------- validation

LIMITS = RequestLimits(max_tokens_limit=100, max_prompt_tokens=50, max_stop_strings=2, max_stop_length=5,
                       max_messages=3, max_request_id_length=8)


@pytest.mark.parametrize("request_, field", [
    (GenerationRequest(), "prompt"),
    (GenerationRequest(prompt="x", messages=(ChatMessage("user", "y"),)), "prompt and messages"),
    (GenerationRequest(messages=(ChatMessage("robot", "y"),)), "messages[0].role"),
    (GenerationRequest(messages=(ChatMessage("user", "y"),) * 4), "messages"),
    (GenerationRequest(prompt="x", max_tokens=0), "max_tokens"),
    (GenerationRequest(prompt="x", max_tokens=101), "max_tokens"),
    (GenerationRequest(prompt="x", temperature=-1.0), "temperature"),
    (GenerationRequest(prompt="x", temperature=float("nan")), "temperature"),
    (GenerationRequest(prompt="x", top_p=2.0), "top_p"),
    (GenerationRequest(prompt="x", top_p=0.0), "top_p"),
    (GenerationRequest(prompt="x", top_k=-1), "top_k"),
    (GenerationRequest(prompt="x", seed=2**63), "seed"),
    (GenerationRequest(prompt="x", stop=("a", "b", "c")), "stop"),
    (GenerationRequest(prompt="x", stop=("",)), "stop[0]"),
    (GenerationRequest(prompt="x", stop=("a", "toolong")), "stop[1]"),
    (GenerationRequest(prompt="x", request_id="123456789"), "request_id"),
    (GenerationRequest(prompt="x", max_draft_tokens=-1), "max_draft_tokens"),
])
def test_bad_requests_name_the_field(request_, field):
    with pytest.raises(InvalidRequestError, match=re.escape(field)):
        validate_request(request_, LIMITS)


def test_good_requests_pass_and_prompt_length_is_checked():
    validate_request(GenerationRequest(prompt="x", max_tokens=100, temperature=0.7, top_p=1.0, top_k=5, seed=0,
                                       stop=("ab", "cd"), request_id="r1"), LIMITS)
    validate_request(GenerationRequest(messages=(ChatMessage("system", ""), ChatMessage("tool", "t"))), LIMITS)
    validate_prompt_length(50, LIMITS)
    with pytest.raises(InvalidRequestError, match="too long: 51 tokens"):
        validate_prompt_length(51, LIMITS)
    with pytest.raises(InvalidRequestError, match="no tokens"):
        validate_prompt_length(0, LIMITS)


# ---------------------------------------------------------------------------- pipeline


class ScriptedScheduler:
    """Streams a fixed list of token chunks; records the request and whether it was closed early."""

    def __init__(self, chunks: list[list[int]], finish: str = "length") -> None:
        self.chunks = chunks
        self.finish = finish
        self.request: TokenizedRequest | None = None
        self.timeout_s: float | None = None
        self.sent = 0
        self.closed_early = False

    async def generate(self, request: TokenizedRequest, timeout_s: float | None):
        self.request, self.timeout_s = request, timeout_s
        try:
            for i, chunk in enumerate(self.chunks):
                last = i == len(self.chunks) - 1
                self.sent += 1
                yield CommittedTokens(tuple(chunk), tuple(-0.5 for _ in chunk), self.finish if last else "",
                                      SpeculationStats(drafted_tokens=3 * (i + 1), accepted_tokens=2 * (i + 1),
                                                       rounds=i + 1))
        except GeneratorExit:
            self.closed_early = True
            raise


def chunked(ids: list[int], seed: int) -> list[list[int]]:
    rng, chunks, i = random.Random(seed), [], 0
    while i < len(ids):
        n = rng.randrange(1, 5)
        chunks.append(ids[i:i + n])
        i += n
    return chunks


async def run_pipeline(tokenizer, scheduler, request: GenerationRequest, **kwargs):
    pipeline = GenerationPipeline(tokenizer, scheduler, stop_token_ids=[2], **kwargs)
    return [r async for r in pipeline.run(request, timeout_s=30.0)]


@pytest.mark.parametrize("seed", range(4))
async def test_pipeline_streams_whole_characters_with_usage_and_stats(byte_tokenizer, seed):
    ids = byte_tokenizer(MULTIBYTE_TEXT, add_special_tokens=False)["input_ids"]
    scheduler = ScriptedScheduler(chunked(ids, seed))
    responses = await run_pipeline(byte_tokenizer, scheduler,
                                   GenerationRequest(prompt="héllo", request_id="r", logprobs=True))
    assert all("\ufffd" not in r.text for r in responses)
    assert "".join(r.text for r in responses) == MULTIBYTE_TEXT
    assert [t for r in responses for t in r.token_ids] == ids
    assert all(len(r.logprobs) == len(r.token_ids) for r in responses)
    assert [r.finish_reason for r in responses[:-1]] == [""] * (len(responses) - 1)
    last = responses[-1]
    assert last.finish_reason == "length" and last.request_id == "r"
    prompt_ids = byte_tokenizer("héllo", add_special_tokens=True)["input_ids"]
    assert scheduler.request.prompt_token_ids == tuple(prompt_ids)
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(prompt_ids), len(ids))
    n = len(scheduler.chunks)
    assert (last.speculation.drafted_tokens, last.speculation.accepted_tokens, last.speculation.rounds) == (3 * n, 2 * n, n)
    assert scheduler.timeout_s is not None and 0 < scheduler.timeout_s <= 30.0


@pytest.mark.parametrize("seed", range(4))
async def test_pipeline_cuts_at_a_multibyte_stop_string_and_ends_the_scheduler_stream(byte_tokenizer, seed):
    ids = byte_tokenizer(MULTIBYTE_TEXT, add_special_tokens=False)["input_ids"]
    scheduler = ScriptedScheduler(chunked(ids, seed))
    responses = await run_pipeline(byte_tokenizer, scheduler, GenerationRequest(prompt="x", stop=("🙂", "語 ")))
    text = "".join(r.text for r in responses)
    assert text == MULTIBYTE_TEXT[: MULTIBYTE_TEXT.index("語 ")]
    assert responses[-1].finish_reason == "stop"
    tokens = [t for r in responses for t in r.token_ids]
    # The completion ends at the token that completed the stop string.
    assert byte_tokenizer.decode(tokens).endswith("語 ") and "語 " not in byte_tokenizer.decode(tokens[:-1])
    assert responses[-1].usage.completion_tokens == len(tokens)
    assert scheduler.closed_early and scheduler.sent < len(scheduler.chunks)


async def test_pipeline_applies_chat_template_and_defaults(byte_tokenizer):
    scheduler = ScriptedScheduler([[2]], finish="stop")
    messages = (ChatMessage("system", "be brief"), ChatMessage("user", "hé"))
    responses = await run_pipeline(byte_tokenizer, scheduler, GenerationRequest(messages=messages))
    expected = byte_tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                                  add_generation_prompt=True, tokenize=True)["input_ids"]
    request = scheduler.request
    assert list(request.prompt_token_ids) == expected
    assert request.max_tokens == 256 and request.params.temperature == 0.0 and request.params.seed is None
    assert request.stop_token_ids == (2,)
    assert [(r.text, r.finish_reason) for r in responses] == [("", "stop")]  # EOS decodes to nothing


async def test_pipeline_refuses_long_prompts_before_calling_the_scheduler(byte_tokenizer):
    scheduler = ScriptedScheduler([[5]])
    with pytest.raises(InvalidRequestError, match="max_prompt_tokens"):
        await run_pipeline(byte_tokenizer, scheduler, GenerationRequest(prompt="x" * 60), limits=LIMITS)
    assert scheduler.request is None


async def test_stream_without_finish_reason_is_an_error(byte_tokenizer):
    class Broken(ScriptedScheduler):
        async def generate(self, request, timeout_s):
            yield CommittedTokens((70,))

    with pytest.raises(SchedulerStreamError):
        await run_pipeline(byte_tokenizer, Broken([]), GenerationRequest(prompt="x"))
