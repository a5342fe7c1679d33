"""A byte-level BPE tokenizer built offline, for tests of text that splits inside characters.

Every byte is a token (GPT-2's byte-to-unicode alphabet) plus a few merges of ASCII pairs, so
"é" (2 bytes), "日" (3 bytes) and "🙂" (4 bytes) always span several tokens and decoding a
prefix of them yields U+FFFD, as with real byte-level BPE vocabularies (GPT-2, Llama 3, Qwen).
Special tokens <unk>=0, <s>=1, </s>=2, <pad>=3 come first; it has the tiny chat template.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.tiny_models import CHAT_TEMPLATE, SPECIAL_TOKENS

MERGES = (("h", "e"), ("l", "l"), ("o", "Ġ"), ("he", "ll"))


def make_byte_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(MERGES), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
