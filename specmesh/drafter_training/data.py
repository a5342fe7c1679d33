"""Training data for a drafter: the verifier's own sampled generations.

A drafter is only useful where it agrees with the verifier on the text the verifier actually
writes, so the data is the verifier's own output (sampled, so it covers more than the single
greedy path), with its chat template when it has one. Prompts come from built-in sets (chat,
code, lists/structured text; built from templates × topics so that held-out prompts are new
combinations) or from a user JSONL file of {"prompt": ...} or {"messages": [...]} lines.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from specmesh.errors import SpecmeshError

PROMPT_SETS = ("chat", "code", "structured")


class PromptFileError(SpecmeshError, ValueError):
    """The --prompts file is missing, unreadable, malformed or empty."""


# --------------------------------------------------------------------------- built-in prompts

_CHAT_TOPICS = (
    "photosynthesis", "black holes", "the French Revolution", "inflation", "machine learning",
    "the immune system", "climate change", "compound interest", "the water cycle", "volcanoes",
    "democracy", "the internet", "vaccines", "renewable energy", "the Roman Empire", "gravity",
    "sleep", "meditation", "electric cars", "coffee", "honey bees", "the stock market",
    "time management", "public speaking", "learning a new language", "the moon landing",
    "earthquakes", "recycling", "healthy eating", "chess", "the human heart", "rainbows",
    "cloud computing", "password security", "friendship", "jazz music", "the ocean tides",
    "dinosaurs", "remote work", "baking bread", "the printing press", "solar panels",
)
_CHAT_TEMPLATES = (
    "Explain {topic} to a beginner.",
    "What is {topic}? Answer in a short paragraph.",
    "Give me three interesting facts about {topic}.",
    "Why does {topic} matter? Keep it brief.",
    "Write a short story that involves {topic}.",
    "What are common misconceptions about {topic}?",
    "Summarize the key ideas of {topic} in a few sentences.",
    "How would you teach a child about {topic}?",
    "Write a haiku about {topic}.",
    "What are the pros and cons of {topic}?",
    "Can you help me understand {topic}? I am confused.",
    "Write a friendly email to a colleague about {topic}.",
)
_CODE_TASKS = (
    "reverses a string", "checks whether a number is prime", "computes the factorial of n",
    "returns the n-th Fibonacci number", "sorts a list of numbers with bubble sort",
    "counts the words in a sentence", "removes duplicates from a list", "merges two sorted lists",
    "finds the maximum value in a list", "checks whether a string is a palindrome",
    "converts Celsius to Fahrenheit", "computes the average of a list of numbers",
    "reads a file and counts its lines", "flattens a nested list", "capitalizes every word",
    "implements binary search", "returns the greatest common divisor of two numbers",
    "counts vowels in a string", "validates an email address", "computes the sum of digits",
)
_CODE_TEMPLATES = (
    "Write a Python function that {task}.",
    "Write a JavaScript function that {task}.",
    "Write a Python function that {task}, with a docstring and an example.",
    "How do I write a function that {task}? Show code.",
    "Write a short C function that {task}.",
)
_STRUCTURED_THINGS = (
    "fruits", "programming languages", "European capitals", "healthy breakfast ideas",
    "tips for studying", "board games", "famous scientists", "houseplants", "kitchen tools",
    "ways to save money", "planets", "musical instruments", "hobbies", "dog breeds",
    "exercises for beginners", "books for teenagers", "sports", "vegetables", "careers in tech",
    "travel destinations",
)
_STRUCTURED_TEMPLATES = (
    "List five {thing}.",
    "Give me a numbered list of {thing} with one sentence each.",
    "Make a markdown table of four {thing} with two columns: name and description.",
    "Write a JSON array of three {thing}, each with a name and a short description.",
    "List {thing} as bullet points, from most to least popular.",
    "Create a simple checklist about {thing}.",
)


def builtin_prompts(sets: Sequence[str] = PROMPT_SETS) -> list[dict[str, Any]]:
    """Chat requests {"messages": [...], "set": name} of the named built-in sets, in a fixed order."""
    unknown = [s for s in sets if s not in PROMPT_SETS]
    if unknown:
        raise ValueError(f"unknown prompt sets {unknown}; choose from {', '.join(PROMPT_SETS)}")
    texts: list[tuple[str, str]] = []
    if "chat" in sets:
        texts += [("chat", t.format(topic=x)) for x in _CHAT_TOPICS for t in _CHAT_TEMPLATES]
    if "code" in sets:
        texts += [("code", t.format(task=x)) for x in _CODE_TASKS for t in _CODE_TEMPLATES]
    if "structured" in sets:
        texts += [("structured", t.format(thing=x)) for x in _STRUCTURED_THINGS for t in _STRUCTURED_TEMPLATES]
    return [{"messages": [{"role": "user", "content": text}], "set": name} for name, text in texts]


def load_prompt_file(path: str | Path) -> list[dict[str, Any]]:
    """Requests from a JSONL file: each non-blank line {"prompt": str} or {"messages": [...]}.

    Raises PromptFileError naming the file (and line) when it is missing, malformed or empty.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {str(path)!r} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise PromptFileError(f"cannot read prompt file {str(path)!r}: {error}") from error
    requests: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptFileError(f"{path}:{number}: not JSON ({error.msg})") from error
        prompt = item.get("prompt") if isinstance(item, dict) else None
        messages = item.get("messages") if isinstance(item, dict) else None
        if isinstance(prompt, str) and prompt.strip():
            requests.append({"prompt": prompt, "set": "file"})
        elif isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            requests.append({"messages": messages, "set": "file"})
        else:
            raise PromptFileError(
                f"{path}:{number}: each line needs a non-empty 'prompt' string or a 'messages' list "
                "of {role, content}")
    if not requests:
        raise PromptFileError(f"prompt file {str(path)!r} holds no prompts")
    return requests


def encode_request(tokenizer: Any, request: dict[str, Any], max_prompt_tokens: int) -> list[int]:
    """Token ids of one request: `messages` through the chat template (when the tokenizer has
    one), `prompt` as raw text. Long prompts keep their last max_prompt_tokens tokens."""
    if "messages" in request:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(list(request["messages"]), add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            text = "\n".join(m["content"] for m in request["messages"])
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    else:
        ids = tokenizer(request["prompt"], add_special_tokens=True)["input_ids"]
    return [int(t) for t in ids][-max_prompt_tokens:]


# --------------------------------------------------------------------------- generations


@dataclass(frozen=True)
class Sample:
    """One training sequence: the prompt, then the verifier's continuation."""

    tokens: tuple[int, ...]
    prompt_length: int
    prompt_set: str = ""  # "chat", "code", "structured" or "file"

    @property
    def num_completion_tokens(self) -> int:
        return len(self.tokens) - self.prompt_length


def split_held_out(items: Sequence[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, held_out): a seeded random split; held-out gets at least one item when there
    are two or more, and train keeps at least one."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    count = int(round(len(items) * fraction))
    if len(items) >= 2:
        count = min(max(count, 1), len(items) - 1)
    else:
        count = 0
    held = sorted(order[:count])
    train = sorted(order[count:])
    return [items[i] for i in train], [items[i] for i in held]


def _left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, L] and attention_mask [B, L], padded on the left (what generate expects)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def sample_generations(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    prompt_sets: Sequence[str] | None = None,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    seed: int,
    deadline: float | None = None,
    max_tokens: int | None = None,
    on_tokens: Callable[[int], None] | None = None,
) -> list[Sample]:
    """The model's sampled continuations of `prompts` (in the given order, batch by batch).

    Stops early, between batches (after the first), at `deadline` (time.monotonic()) or once
    `max_tokens` completion tokens exist. A continuation ends after its first end-of-sequence token, which
    is kept: the drafter must learn to predict the end too. on_tokens(n) reports progress.
    """
    device = next(model.parameters()).device
    generator_seed = seed
    samples: list[Sample] = []
    produced = 0
    eos = set(int(t) for t in eos_token_ids)
    for start in range(0, len(prompts), batch_size):
        if samples and deadline is not None and time.monotonic() >= deadline:
            break  # (the first batch always runs: some data beats none)
        if max_tokens is not None and produced >= max_tokens:
            break
        batch = [list(p) for p in prompts[start:start + batch_size]]
        input_ids, attention_mask = _left_padded(batch, pad_token_id, device)
        torch.manual_seed(generator_seed + start)  # seeds CPU and CUDA generators alike
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=1.0,  # the verifier's own distribution: no truncation
            top_k=0,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_token_id,
            eos_token_id=list(eos) or None,
        )
        continuations = output[:, input_ids.shape[1]:].tolist()
        sets = list(prompt_sets[start:start + batch_size]) if prompt_sets is not None else [""] * len(batch)
        for prompt, continuation, prompt_set in zip(batch, continuations, sets):
            kept: list[int] = []
            for token in continuation:
                kept.append(int(token))
                if token in eos:
                    break
            if kept:
                samples.append(Sample(tuple(prompt + kept), len(prompt), prompt_set))
                produced += len(kept)
                if on_tokens is not None:
                    on_tokens(len(kept))
    return samples
