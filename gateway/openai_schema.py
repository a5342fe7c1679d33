"""The OpenAI wire format, without HTTP: request bodies of /v1/completions and
/v1/chat/completions in, GenerationRequest out; response records in, OpenAI response objects
and stream chunks out.

Bodies are untrusted: JSON is parsed strictly (UTF-8 only, no NaN/Infinity, nesting bounded by
the parser), every field is type-checked by hand (booleans are not numbers, floats are not
integers), and any field this server does not implement is refused with a 400 naming it,
rather than silently ignored. Fields OpenAI defines whose neutral value is what we do anyway
(n=1, echo=false, zero penalties, ...) are accepted at that value only. Extensions: top_k,
disable_speculation, return_token_ids (token ids in every choice, as vLLM names it).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from gateway.records import ChatMessage, GenerationRequest, GenerationResponse, Usage
from specmesh.errors import InvalidRequestError

MAX_USER_LENGTH = 512

Json = dict[str, Any]
TokenText = Callable[[int], str]  # token id -> its text (for logprobs)


class ModelNotFoundError(InvalidRequestError):
    """The request names a model this gateway does not serve (HTTP 404)."""


class BodyTooLargeError(InvalidRequestError):
    """The request body is over max_body_bytes (HTTP 413)."""


@dataclass(frozen=True)
class OpenAIRequest:
    kind: str  # "chat" or "completion"
    generation: GenerationRequest
    model: str
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    logprobs: bool = False
    return_token_ids: bool = False


# ---------------------------------------------------------------------------- parsing


def _reject_constant(name: str) -> Any:
    raise InvalidRequestError(f"request body is not valid JSON: {name} is not a JSON number")


def parse_json_body(body: bytes) -> Json:
    """Strict JSON object from the raw body; InvalidRequestError for anything else."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidRequestError(f"request body is not valid UTF-8 (byte {error.start})") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidRequestError("request body is not valid JSON: nested too deeply") from None
    except ValueError as error:  # JSONDecodeError, and integers with too many digits
        if isinstance(error, InvalidRequestError):
            raise
        raise InvalidRequestError(f"request body is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise InvalidRequestError(f"request body must be a JSON object, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


class _Fields:
    """Takes typed fields out of a JSON object; whatever is left at the end is unknown."""

    def __init__(self, body: Json, where: str = "") -> None:
        self.body = dict(body)
        self.where = where

    def _name(self, name: str) -> str:
        return f"{self.where}{name}"

    def take(self, name: str) -> Any:
        return self.body.pop(name, None)

    def string(self, name: str, required: bool = False, max_length: int | None = None) -> str | None:
        value = self.take(name)
        if value is None:
            if required:
                raise InvalidRequestError(f"{self._name(name)} is required")
            return None
        if not isinstance(value, str):
            raise InvalidRequestError(f"{self._name(name)} must be a string, got {_json_type(value)}")
        if max_length is not None and len(value) > max_length:
            raise InvalidRequestError(f"{self._name(name)} must be at most {max_length} characters")
        return _unicode(value, self._name(name))

    def integer(self, name: str) -> int | None:
        value = self.take(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
                return int(value)  # 16.0 is what some clients send for 16
            raise InvalidRequestError(f"{self._name(name)} must be an integer, got {_json_type(value)} {value!r:.40}")
        return value

    def number(self, name: str) -> float | None:
        value = self.take(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidRequestError(f"{self._name(name)} must be a number, got {_json_type(value)}")
        try:
            number = float(value)
        except OverflowError:
            raise InvalidRequestError(f"{self._name(name)} is out of range") from None
        if not math.isfinite(number):
            raise InvalidRequestError(f"{self._name(name)} must be finite")
        return number

    def boolean(self, name: str) -> bool | None:
        value = self.take(name)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise InvalidRequestError(f"{self._name(name)} must be a boolean, got {_json_type(value)}")
        return value

    def only(self, name: str, allowed: Sequence[Any], why: str) -> None:
        """A field we accept only at its neutral value(s)."""
        value = self.take(name)
        if value is not None and not any(_same(value, a) for a in allowed):
            raise InvalidRequestError(f"{self._name(name)}={value!r:.40} is not supported: {why}")

    def finish(self) -> None:
        if self.body:
            names = ", ".join(sorted(repr(k)[:60] for k in self.body)[:8])
            where = f" in {self.where.rstrip('.')}" if self.where else ""
            raise InvalidRequestError(f"unsupported or unknown field(s){where}: {names}")


def _same(value: Any, allowed: Any) -> bool:
    """value == allowed, where true is not 1 and 0.0 is 0."""
    if isinstance(value, bool) or isinstance(allowed, bool):
        return type(value) is type(allowed) and value == allowed
    if isinstance(allowed, (int, float)):
        return isinstance(value, (int, float)) and value == allowed
    return type(value) is type(allowed) and value == allowed


def _unicode(value: str, where: str) -> str:
    """JSON escapes can spell lone surrogates (\\ud800), which are not text: no tokenizer takes them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRequestError(f"{where} is not valid Unicode (lone surrogate at {error.start})") from None
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (_unicode(value, "stop"),)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(_unicode(s, f"stop[{i}]") for i, s in enumerate(value))
    raise InvalidRequestError("stop must be a string or an array of strings")


def _common(fields: _Fields, model_name: str) -> dict[str, Any]:
    """Fields shared by both endpoints, as GenerationRequest keyword arguments (and a few extras)."""
    model = fields.string("model", required=True, max_length=1024)
    if model != model_name:
        raise ModelNotFoundError(f"the model {model[:200]!r} does not exist here; this gateway serves {model_name!r}")
    options: dict[str, Any] = dict(
        max_tokens=fields.integer("max_tokens"),
        temperature=fields.number("temperature"),
        top_p=fields.number("top_p"),
        top_k=fields.integer("top_k"),
        seed=fields.integer("seed"),
        stop=_stop(fields.take("stop")),
        disable_speculation=bool(fields.boolean("disable_speculation")),
    )
    if options["top_k"] == -1:
        options["top_k"] = 0  # vLLM's spelling of "no top-k"
    fields.string("user", max_length=MAX_USER_LENGTH)  # accepted; not used (it may identify a person)
    fields.only("n", [1], "this server returns one choice per request")
    fields.only("presence_penalty", [0], "penalties are not implemented")
    fields.only("frequency_penalty", [0], "penalties are not implemented")
    logit_bias = fields.take("logit_bias")
    if logit_bias not in (None, {}):
        raise InvalidRequestError("logit_bias is not supported")
    return options


def _stream_options(fields: _Fields, stream: bool) -> bool:
    value = fields.take("stream_options")
    if value is None:
        return False
    if not isinstance(value, dict):
        raise InvalidRequestError("stream_options must be an object")
    if not stream:
        raise InvalidRequestError("stream_options is only allowed when stream is true")
    options = _Fields(value, "stream_options.")
    include_usage = bool(options.boolean("include_usage"))
    options.finish()
    return include_usage


def parse_completion_request(body: Json, model_name: str, request_id: str) -> OpenAIRequest:
    fields = _Fields(body)
    prompt = fields.take("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidRequestError("prompt must be a string (one prompt per request; token id prompts are not "
                                  "supported)")
    _unicode(prompt, "prompt")
    options = _common(fields, model_name)
    stream = bool(fields.boolean("stream"))
    include_usage = _stream_options(fields, stream)
    logprobs = fields.integer("logprobs")
    if logprobs is not None and logprobs != 0:
        raise InvalidRequestError("logprobs must be 0 or null: the log-probability of each generated token is "
                                  "returned, top alternatives are not")
    return_token_ids = bool(fields.boolean("return_token_ids"))
    fields.only("echo", [False], "the prompt is never echoed")
    fields.only("best_of", [1], "this server returns one choice per request")
    fields.only("suffix", [""], "suffixes (insertion) are not implemented")
    fields.finish()
    generation = GenerationRequest(prompt=prompt, request_id=request_id, logprobs=logprobs is not None, **options)
    return OpenAIRequest("completion", generation, model_name, stream, include_usage, logprobs is not None,
                         return_token_ids)


CHAT_ROLE_ALIASES = {"developer": "system"}


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return _unicode(value, where)
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict):
                raise InvalidRequestError(f"{where}[{i}] must be an object")
            part_fields = _Fields(part, f"{where}[{i}].")
            kind = part_fields.string("type", required=True, max_length=64)
            if kind != "text":
                raise InvalidRequestError(f"{where}[{i}].type {kind!r} is not supported: only text content")
            parts.append(part_fields.string("text", required=True))
            part_fields.finish()
        return "".join(parts)
    raise InvalidRequestError(f"{where} must be a string or an array of text parts, got {_json_type(value)}")


def _messages(value: Any) -> tuple[ChatMessage, ...]:
    if not isinstance(value, list) or not value:
        raise InvalidRequestError("messages must be a non-empty array")
    messages = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise InvalidRequestError(f"messages[{i}] must be an object, got {_json_type(item)}")
        fields = _Fields(item, f"messages[{i}].")
        role = fields.string("role", required=True, max_length=64)
        content = _content(fields.take("content"), f"messages[{i}].content")
        fields.string("name", max_length=256)  # accepted; the chat template decides what it shows
        fields.finish()
        messages.append(ChatMessage(CHAT_ROLE_ALIASES.get(role, role), content))
    return tuple(messages)


def parse_chat_request(body: Json, model_name: str, request_id: str) -> OpenAIRequest:
    fields = _Fields(body)
    messages = _messages(fields.take("messages"))
    options = _common(fields, model_name)
    max_completion_tokens = fields.integer("max_completion_tokens")
    if max_completion_tokens is not None:
        if options["max_tokens"] is not None and options["max_tokens"] != max_completion_tokens:
            raise InvalidRequestError("max_tokens and max_completion_tokens disagree; send one of them")
        options["max_tokens"] = max_completion_tokens
    stream = bool(fields.boolean("stream"))
    include_usage = _stream_options(fields, stream)
    logprobs = bool(fields.boolean("logprobs"))
    fields.only("top_logprobs", [0], "top alternatives are not returned, only each token's log-probability")
    return_token_ids = bool(fields.boolean("return_token_ids"))
    response_format = fields.take("response_format")
    if response_format not in (None, {"type": "text"}):
        raise InvalidRequestError("response_format is not supported (only {'type': 'text'})")
    fields.finish()
    generation = GenerationRequest(messages=messages, request_id=request_id, logprobs=logprobs, **options)
    return OpenAIRequest("chat", generation, model_name, stream, include_usage, logprobs, return_token_ids)


# ---------------------------------------------------------------------------- responses


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> Json:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage_json(usage: Usage) -> Json:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def _finish_reason(reason: str) -> str | None:
    return reason or None


@dataclass
class ResponseBuilder:
    """Builds the OpenAI objects of one request (whole, or as stream chunks)."""

    request: OpenAIRequest
    token_text: TokenText
    request_id: str
    created: int = field(default_factory=lambda: int(time.time()))
    _text_offset: int = 0

    @property
    def chat(self) -> bool:
        return self.request.kind == "chat"

    @property
    def id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.request_id

    def _envelope(self, choices: list[Json], chunk: bool) -> Json:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.request.model,
                "choices": choices}

    def _logprobs(self, token_ids: Sequence[int], logprobs: Sequence[float]) -> Json | None:
        if not self.request.logprobs:
            return None
        texts = [self.token_text(t) for t in token_ids]
        if self.chat:
            return {"content": [{"token": text, "logprob": lp,
                                 "bytes": None if "\ufffd" in text else list(text.encode("utf-8")),
                                 "top_logprobs": []} for text, lp in zip(texts, logprobs)]}
        offsets = []
        for text in texts:
            offsets.append(self._text_offset)
            self._text_offset += len(text)
        return {"tokens": texts, "token_logprobs": list(logprobs), "top_logprobs": None, "text_offset": offsets}

    def _choice(self, text: str, token_ids: Sequence[int], logprobs: Sequence[float], finish_reason: str,
                chunk: bool, first: bool = False) -> Json:
        choice: Json = {"index": 0}
        if self.chat:
            if chunk:
                choice["delta"] = ({"role": "assistant", "content": text} if first else
                                   ({"content": text} if text or token_ids else {}))
            else:
                choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = self._logprobs(token_ids, logprobs)
        choice["finish_reason"] = _finish_reason(finish_reason)
        if self.request.return_token_ids:
            choice["token_ids"] = list(token_ids)
        return choice

    def whole(self, responses: Iterable[GenerationResponse]) -> Json:
        responses = list(responses)
        last = responses[-1]
        text = "".join(r.text for r in responses)
        token_ids = [t for r in responses for t in r.token_ids]
        logprobs = [lp for r in responses for lp in r.logprobs]
        body = self._envelope([self._choice(text, token_ids, logprobs, last.finish_reason, chunk=False)], chunk=False)
        body["usage"] = usage_json(last.usage)
        return body

    def first_chunks(self) -> list[Json]:
        """Sent as soon as the request is admitted: chat streams open with the assistant role."""
        if not self.chat:
            return []
        return [self._envelope([self._choice("", (), (), "", chunk=True, first=True)], chunk=True)]

    def chunks(self, response: GenerationResponse) -> list[Json]:
        out = []
        if response.text or response.token_ids:
            out.append(self._envelope([self._choice(response.text, response.token_ids, response.logprobs, "",
                                                    chunk=True)], chunk=True))
        if response.finish_reason:
            out.append(self._envelope([self._choice("", (), (), response.finish_reason, chunk=True)], chunk=True))
            if self.request.include_usage:
                usage_chunk = self._envelope([], chunk=True)
                usage_chunk["usage"] = usage_json(response.usage)
                out.append(usage_chunk)
        return out
