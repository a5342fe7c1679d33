"""Tiny models and tokenizers built in code, offline, for tests of every layer.

- make_tiny_tokenizer: a WordLevel tokenizer (whitespace-split words) wrapped in
  PreTrainedTokenizerFast, with <unk>=0, <s>=1 (bos), </s>=2 (eos), <pad>=3 and a small chat
  template. Words are a few English words then "w<i>" fillers up to ``vocab_size``.
- make_tiny_llama: a random-weight float32 LlamaForCausalLM, seeded, in eval mode.
- save_tiny_model: both saved with save_pretrained into a directory (a valid REF).

Two tokenizers built with the same arguments are identical; ``token_prefix`` changes the
filler words (same size, different vocabulary) for mismatch tests.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
COMMON_WORDS = (
    "the", "a", "cat", "dog", "sat", "on", "mat", "and", "is", "of",
    "hello", "world", "user", "assistant", "system", ":", ".", ",", "?", "!",
)  # fmt: skip

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def tiny_vocab(vocab_size: int = 64, token_prefix: str = "w") -> dict[str, int]:
    """token -> id for make_tiny_tokenizer."""
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 1}")
    tokens = list(SPECIAL_TOKENS) + list(COMMON_WORDS)
    tokens = tokens[:vocab_size]
    i = 0
    while len(tokens) < vocab_size:
        tokens.append(f"{token_prefix}{i}")
        i += 1
    return {tok: idx for idx, tok in enumerate(tokens)}


def make_tiny_tokenizer(vocab_size: int = 64, token_prefix: str = "w") -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel(vocab=tiny_vocab(vocab_size, token_prefix), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_llama(
    vocab_size: int = 64,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    *,
    intermediate: int | None = None,
    max_position_embeddings: int = 512,
) -> LlamaForCausalLM:
    """Random-weight float32 Llama; the same arguments give the same weights."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    # Initialisation draws from the global RNG: fork it so tests stay independent of each other.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.eval()
    return model


def save_tiny_model(
    directory: Path | str,
    vocab_size: int = 64,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    *,
    tokenizer_vocab_size: int | None = None,
    token_prefix: str = "w",
) -> Path:
    """Save a tiny Llama + tokenizer into ``directory`` and return it.

    ``vocab_size`` is the embedding size; ``tokenizer_vocab_size`` (default the same) may be
    smaller, like real models whose embeddings are padded.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = make_tiny_llama(vocab_size, hidden, layers, heads, kv_heads, seed)
    tokenizer = make_tiny_tokenizer(tokenizer_vocab_size or vocab_size, token_prefix)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
