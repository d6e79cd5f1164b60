"""A loss in the units people report: perplexity for GPT-2 tokens, bits per byte for every tokenizer.

The loss is the mean token loss in nats. Perplexity, exp(loss), is per token, so it compares runs of one
tokenizer only: it is reported for GPT-2 tokens, the unit WikiText papers use. Bits per byte compares the two
tokenizers: the loss summed over the evaluated tokens, in bits, over the UTF-8 bytes of exactly those tokens
(docs/DESIGN.md, section 9). For the bytes tokenizer every token is one byte, so it is loss / ln 2 exactly.
"""

from __future__ import annotations

import math
from typing import Any

LN2 = math.log(2)
_EXP_LIMIT = math.log(2**1023)  # math.exp above this raises OverflowError: the perplexity is +inf
PERPLEXITY_TOKENIZERS = ("gpt2",)


def perplexity(loss: float) -> float:
    """exp(loss), +inf where it overflows (a diverging run), NaN for NaN."""
    return math.inf if loss > _EXP_LIMIT else math.exp(loss)


def bits_per_byte(loss: float, n_tokens: int, n_bytes: int) -> float:
    """The mean token loss `loss` (nats) over `n_tokens` tokens that spell `n_bytes` UTF-8 bytes, in bits per byte.

    Written as loss / ln 2 times the tokens per byte, so that one byte per token gives loss / ln 2 exactly."""
    if n_bytes <= 0:
        raise ValueError(f"bits per byte needs the evaluated text's bytes (got {n_bytes})")
    return loss / LN2 * (n_tokens / n_bytes)


def loss_units(prefix: str, loss: float, tokenizer: str, n_tokens: int, n_bytes: int) -> dict[str, Any]:
    """`{prefix}_ppl` (GPT-2 tokens only) and `{prefix}_bpb` of a mean token loss, for a metrics row or summary."""
    units = {f"{prefix}_ppl": perplexity(loss)} if tokenizer in PERPLEXITY_TOKENIZERS else {}
    units[f"{prefix}_bpb"] = bits_per_byte(loss, n_tokens, n_bytes)
    return units
