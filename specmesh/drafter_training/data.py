"""Training data for a drafter: the verifier's own sampled generations.

A drafter is only useful where it agrees with the verifier on the text the verifier actually
writes, so the data is the verifier's own output (sampled, so it covers more than the single
greedy path), with its chat template when it has one. Prompts come from built-in sets (chat,
code, lists/structured text) or from a user JSONL file of {"prompt": ...} or {"messages": [...]}
lines.

The built-in chat set mixes many ways of asking (questions, instructions with length or format
limits, casual requests, comparisons, advice, creative writing, role and system prompts, short
multi-turn exchanges) over many subjects: a drafter trained on one phrasing (templates x topics)
learns that phrasing's answers and agrees far less on differently worded requests. The
`specmesh bench` prompts (specmesh/workloads.py) are never trained on: they are how the
drafter is measured on phrasing it has not seen.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from specmesh.errors import SpecmeshError

log = logging.getLogger(__name__)

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


# Varied phrasings over more subjects (none of the `specmesh bench` prompts' subjects).
_SUBJECTS = _CHAT_TOPICS + (
    "the Great Wall of China", "antibiotics", "the speed of light", "plate tectonics", "the Renaissance",
    "blockchain", "quantum computers", "the Silk Road", "bird migration", "the periodic table",
    "supply and demand", "the Olympic Games", "coral reefs", "artificial intelligence", "tea",
    "the Industrial Revolution", "wind turbines", "DNA", "the Amazon rainforest", "budgeting",
    "open source software", "the pyramids of Egypt", "hurricanes", "electricity", "photography",
    "minimalism", "the solar system", "fermentation", "memory and forgetting", "social media",
    "urban gardening", "the Cold War", "3D printing", "marathon running", "nuclear power",
    "the theory of evolution", "credit scores", "origami", "glaciers", "the human brain",
)
_QUESTIONS = (
    "What is {s}?", "How does {s} work?", "Why is {s} important?", "What should everyone know about {s}?",
    "Can you tell me about {s}?", "hey, what's the deal with {s}?", "Is {s} overrated?",
    "What are the main causes and effects of {s}?", "How would you explain {s} to a ten-year-old?",
    "What's the history of {s}, in brief?", "Tell me something surprising about {s}.",
    "What are the biggest open questions about {s}?", "How has {s} changed over time?",
    "I keep hearing about {s}. What is it, in simple terms?", "What do experts disagree about regarding {s}?",
    "Could you give me a quick overview of {s}?", "Where can I see {s} in everyday life?",
    "What would happen if {s} did not exist?",
)
_LIMITS = (
    "", " Answer briefly.", " Keep it under 100 words.", " Use two sentences.", " Answer in three sentences.",
    " Use simple words.", " Be concise.", " Use an analogy.", " Answer in one paragraph.",
)
_INSTRUCTIONS = (
    "Describe {s} in two sentences.", "Explain {s} in three sentences.", "Write a limerick about {s}.",
    "Write a four-line poem about {s}.", "Write a tweet about {s}.", "Write an opening line for a novel about {s}.",
    "Summarize what you know about {s} as a list of key points.", "Give a one-sentence definition of {s}.",
    "Write a short dialogue between two friends discussing {s}.", "Write a quiz question about {s}, with the answer.",
    "Describe {s} as if you were a tour guide.", "Write a product description for a board game about {s}.",
    "Explain {s} using a cooking analogy.", "Write a motivational quote inspired by {s}.",
    "Draft a short blog post introduction about {s}.", "Write a riddle whose answer is {s}.",
)
_PAIRS = (
    ("cats", "dogs"), ("tea", "coffee"), ("trains", "planes"), ("books", "films"), ("solar power", "wind power"),
    ("running", "swimming"), ("renting", "buying a home"), ("Python", "JavaScript"), ("email", "instant messaging"),
    ("weather", "climate"), ("a virus", "a bacterium"), ("stocks", "bonds"), ("mountains", "beaches"),
    ("paper books", "e-readers"), ("cities", "the countryside"), ("RAM", "disk storage"), ("a lake", "a pond"),
    ("baking", "frying"), ("introverts", "extroverts"), ("a comet", "an asteroid"),
)
_COMPARISONS = (
    "What is the difference between {a} and {b}?", "Compare {a} and {b}.", "{a} or {b}: which is better and why?",
    "How are {a} and {b} alike, and how do they differ?", "Give two differences between {a} and {b}.",
)
_ACTIVITIES = (
    "sleeping better", "staying focused", "learning to cook", "saving for a holiday", "making new friends",
    "starting to run", "keeping a journal", "reading more books", "giving feedback", "preparing for an interview",
    "decluttering a room", "learning to draw", "taking better photos", "planning a trip", "staying hydrated",
    "studying for exams", "speaking up in meetings", "keeping plants alive", "waking up early", "writing a resume",
)
_ADVICE = (
    "Give me three tips for {a}.", "What are some good habits for {a}?", "I'm struggling with {a}. Any advice?",
    "What is the best way to get started with {a}?", "Suggest a simple plan for {a}.",
    "What mistakes do beginners make when {a}?", "List four ideas for {a}, with a sentence each.",
)
_THINGS_TO_NAME = (
    "a coffee shop", "a pet turtle", "a hiking club", "a bakery", "a podcast about science", "a sailing boat",
    "a chess app", "a garden", "a travel blog", "a rock band", "a cat", "a bookstore",
)
_NAMING = (
    "Suggest a name for {t} and explain your choice.", "Give me five name ideas for {t}.",
    "What would be a catchy name for {t}?",
)
_SCENES = (
    "a busy market in the morning", "a thunderstorm at night", "a quiet library", "a snowy forest",
    "a train station at rush hour", "autumn leaves in a park", "a desert at noon", "a city skyline at dusk",
    "a mountain lake", "a kitchen on a holiday",
)
_DESCRIBE = ("Describe {t} in two sentences.", "Write a short paragraph describing {t}.",
             "Describe {t} using all five senses.", "Write a haiku about {t}.")
_SYSTEMS = (
    "You are a helpful assistant.", "You are a concise assistant. Answer in as few words as possible.",
    "You are a friendly teacher who explains things simply.", "You are an expert who answers precisely.",
)
_FOLLOW_UPS = (
    ("I'd like to learn about {s}.", "Sure! What would you like to know about {s}?", "Start with the basics, please."),
    ("Can you explain {s}?", "Of course. Do you want a short or a detailed explanation?", "A short one, please."),
    ("What is {s}?", "Happy to help. Are you asking for school, work or curiosity?", "Just curiosity. Keep it simple."),
    ("Tell me about {s}.", "Sure. Any particular aspect?", "Why does it matter to ordinary people?"),
    ("I have a question about {s}.", "Go ahead, ask away!", "What is one common misunderstanding about it?"),
)


def _varied_chat_prompts(seed: int = 7) -> list[list[dict[str, str]]]:
    """Chat requests (message lists) in many phrasings: a seeded sample, so the set stays a
    fixed, reproducible size rather than every combination."""
    rng = random.Random(seed)
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    out: list[list[dict[str, str]]] = []
    for subject in _SUBJECTS:
        for template in rng.sample(_QUESTIONS, 6):
            text = template.format(s=subject)
            out.append(user(text[0].upper() + text[1:] + rng.choice(_LIMITS)))
        for template in rng.sample(_INSTRUCTIONS, 4):
            out.append(user(template.format(s=subject)))
        system = rng.choice(_SYSTEMS)
        out.append([{"role": "system", "content": system}] + user(rng.choice(_QUESTIONS).format(s=subject)))
        first, reply, second = rng.choice(_FOLLOW_UPS)
        out.append([{"role": "user", "content": first.format(s=subject)},
                    {"role": "assistant", "content": reply.format(s=subject)},
                    {"role": "user", "content": second}])
    for a, b in _PAIRS:
        out += [user(t.format(a=a, b=b)) for t in rng.sample(_COMPARISONS, 3)]
    for activity in _ACTIVITIES:
        out += [user(t.format(a=activity)) for t in rng.sample(_ADVICE, 4)]
    for thing in _THINGS_TO_NAME:
        out += [user(t.format(t=thing)) for t in _NAMING]
    for scene in _SCENES:
        out += [user(t.format(t=scene)) for t in _DESCRIBE]
    return out


# Requests that carry a passage and ask about it (summarise, list its facts, rewrite it):
# serving workloads do this a lot (`specmesh bench`'s summarisation set, RAG), and the verifier's
# answer there copies from the prompt. A drafter that never saw such requests does not learn to
# copy. The passages are the verifier's own greedy answers to training prompts, so no text from
# outside (and none of the bench's articles) is needed.
_CONTEXT_TEMPLATES = (
    "Summarize this text in two sentences:\n\n{p}",
    "Summarize this article in one sentence:\n\n{p}",
    "Repeat the key facts of this text as a bulleted list:\n\n{p}",
    "Summarize: {p}",
    "What is the main point of this passage?\n\n{p}",
    "Rewrite this paragraph in simpler words:\n\n{p}",
    "List three facts mentioned in the following text.\n\n{p}",
    "{p}\n\nSummarize the text above briefly.",
    "Read the passage and answer: what is it about?\n\n{p}",
    "Turn this text into a short numbered list of its points:\n\n{p}",
)
CONTEXT_SET = "context"


def context_prompts(passages: Sequence[str], count: int, seed: int) -> list[dict[str, Any]]:
    """Up to `count` chat requests {"messages", "set": "context"}, each a template above filled
    with one passage (a seeded choice; passages are used once each, then again if count needs it)."""
    usable = [p.strip() for p in passages if p and p.strip()]
    if not usable or count <= 0:
        return []
    rng = random.Random(seed)
    order = list(range(len(usable)))
    rng.shuffle(order)
    bench = _bench_texts()
    out: list[dict[str, Any]] = []
    for i in range(count):
        text = rng.choice(_CONTEXT_TEMPLATES).format(p=usable[order[i % len(order)]])
        if text.strip() not in bench:
            out.append({"messages": [{"role": "user", "content": text}], "set": CONTEXT_SET})
    return out


def _bench_texts() -> set[str]:
    from specmesh.workloads import WORKLOADS

    return {text.strip() for texts in WORKLOADS.values() for text in texts}


def builtin_prompts(sets: Sequence[str] = PROMPT_SETS) -> list[dict[str, Any]]:
    """Chat requests {"messages": [...], "set": name} of the named built-in sets, in a fixed order."""
    unknown = [s for s in sets if s not in PROMPT_SETS]
    if unknown:
        raise ValueError(f"unknown prompt sets {unknown}; choose from {', '.join(PROMPT_SETS)}")
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    requests: list[tuple[str, list[dict[str, str]]]] = []
    if "chat" in sets:
        requests += [("chat", user(t.format(topic=x))) for x in _CHAT_TOPICS for t in _CHAT_TEMPLATES]
        requests += [("chat", messages) for messages in _varied_chat_prompts()]
    if "code" in sets:
        requests += [("code", user(t.format(task=x))) for x in _CODE_TASKS for t in _CODE_TEMPLATES]
    if "structured" in sets:
        requests += [("structured", user(t.format(thing=x))) for x in _STRUCTURED_THINGS
                     for t in _STRUCTURED_TEMPLATES]
    # The benchmark's prompts stay unseen, whatever the templates happen to produce.
    bench = _bench_texts()
    return [{"messages": messages, "set": name} for name, messages in requests
            if not any(m["content"].strip() in bench for m in messages)]


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
    prompt_set: str = ""  # "chat", "code", "structured", "context" or "file"

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
    start = 0
    while start < len(prompts):
        if samples and deadline is not None and time.monotonic() >= deadline:
            break  # (the first batch always runs: some data beats none)
        if max_tokens is not None and produced >= max_tokens:
            break
        batch = [list(p) for p in prompts[start:start + batch_size]]
        input_ids, attention_mask = _left_padded(batch, pad_token_id, device)
        torch.manual_seed(generator_seed + start)  # seeds CPU and CUDA generators alike
        try:
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
        except torch.OutOfMemoryError:
            # A larger verifier (or a smaller GPU) than the default batch was sized for: halve
            # the batch and go on, rather than losing the run.
            if batch_size == 1:
                raise
            del input_ids, attention_mask
            torch.cuda.empty_cache()
            batch_size = max(1, batch_size // 2)
            log.warning("generation ran out of GPU memory; batch halved to %d", batch_size)
            continue
        continuations = output[:, input_ids.shape[1]:].tolist()
        sets = list(prompt_sets[start:start + len(batch)]) if prompt_sets is not None else [""] * len(batch)
        start += len(batch)
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
