"""Built-in prompt sets for benchmarks: chat, code, and summarisation with context.

Short on purpose: the CPU runs of `specmesh bench` must finish in minutes. A JSONL file of
{"prompt": ...} or {"messages": [...]} lines replaces them for real workloads.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT = [
    "Write a haiku about distributed systems.",
    "Explain what a hash map is, in three sentences.",
    "Give me three tips for writing clear emails.",
    "What is the difference between a process and a thread?",
    "Describe a sunrise over the sea in two sentences.",
    "List four fruits that are rich in vitamin C.",
    "Why is the sky blue? Answer briefly.",
    "Suggest a name for a friendly robot and explain it.",
]

CODE = [
    "Write a Python function that reverses a string.",
    "Write a Python function is_prime(n) with a docstring.",
    "Write a SQL query that counts orders per customer in a table orders(customer_id, id).",
    "Write a bash one-liner that counts the lines of every .py file in a directory.",
]

_ARTICLE = (
    "The city council met on Tuesday to discuss the new bicycle lanes on Main Street. "
    "Supporters said the lanes would make cycling safer and reduce traffic. "
    "Shop owners worried that removing parking spaces would hurt their business. "
    "The council voted to build the lanes but to add a new parking garage near the station."
)

SUMMARISATION = [
    f"Summarize this article in two sentences:\n\n{_ARTICLE}",
    f"Repeat the key facts of this article as a bulleted list:\n\n{_ARTICLE}",
    "Summarize: The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran away into "
    "the forest.",
]

WORKLOADS = {"chat": CHAT, "code": CODE, "summarisation": SUMMARISATION}


def load_workload(name_or_path: str) -> list[dict]:
    """Requests as dicts with `messages` (chat-templated) or `prompt`."""
    if name_or_path in WORKLOADS:
        return [{"messages": [{"role": "user", "content": text}]} for text in WORKLOADS[name_or_path]]
    if name_or_path == "mixed":
        return [r for name in WORKLOADS for r in load_workload(name)]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"unknown workload {name_or_path!r}: use {', '.join([*WORKLOADS, 'mixed'])} or a JSONL file")
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        if not isinstance(item, dict) or not ({"prompt", "messages"} & item.keys()):
            raise ValueError(f"{path}:{number}: each line needs 'prompt' or 'messages'")
        requests.append({k: item[k] for k in ("prompt", "messages") if k in item})
    return requests
