"""Deterministic "model output" for the simulated replica.

The same prompt always yields the same tokens, in this process or another, so
a test can compare a response fetched directly from a replica with one fetched
through the gateway. Tokens are words of a small fixed vocabulary, chosen from
a CRC of the prompt; the first has no leading space, the others one, so the
joined text reads like a sentence. A prompt's token count is its word count
(at least 1): a cheap, stable estimate, not a real tokenizer.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

VOCAB: tuple[str, ...] = (
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog",
    "while", "model", "replica", "serves", "tokens", "from", "its", "cache",
    "and", "gateway", "routes", "every", "request", "to", "healthy", "backend",
    "stream", "keeps", "flowing", "until", "end", "of", "text",
)  # fmt: skip

#: Token ids start here, as if the vocabulary sat after special tokens.
TOKEN_ID_BASE = 1000


@dataclass(frozen=True, slots=True)
class Token:
    id: int
    text: str
    #: A made-up, deterministic log probability in (-1, 0).
    logprob: float


def count_prompt_tokens(text: str) -> int:
    return max(1, len(text.split()))


def generate_tokens(prompt: str, count: int) -> list[Token]:
    """``count`` tokens determined by ``prompt`` alone."""
    start = zlib.crc32(prompt.encode("utf-8", "surrogatepass"))
    size = len(VOCAB)
    tokens = []
    for i in range(count):
        index = (start + i * 7) % size
        word = VOCAB[index]
        tokens.append(
            Token(
                id=TOKEN_ID_BASE + index,
                text=word if i == 0 else " " + word,
                logprob=-round(0.05 + (index % 10) * 0.09, 4),
            )
        )
    return tokens
