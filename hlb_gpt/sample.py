"""Text from a trained model: autoregressive sampling with temperature and top-k.

`generate` is the whole algorithm on token ids; `sample_text` adds the tokenizer. Randomness comes only from
the `torch.Generator` passed in, so a seed gives the same text on the same device (on the CPU, exactly).
There is no key/value cache: each new token runs the model over the (cropped) context again, which costs
nothing at the sizes this project trains and keeps the model's forward the only one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hlb_gpt.config import ConfigError
from hlb_gpt.data import Tokenizer


# What `torch.Generator.manual_seed` takes, without its negative half (training refuses negative seeds too).
MAX_SEED = 2**64 - 1


class NonFiniteScores(ValueError):
    """The model's next-token scores hold NaN or infinity: its weights are damaged or overflow."""


def check_sampling(prompt: str, tokens: int, temperature: float, top_k: int | None, seed: int = 0) -> None:
    """One-line errors for settings that cannot sample."""
    if not prompt:  # any other text is at least one token, in bytes and in GPT-2 BPE
        raise ConfigError("--prompt must not be empty: the model needs at least one token to continue")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # a byte the shell passed that is not UTF-8 arrives as a lone surrogate
        raise ConfigError(f"--prompt is not UTF-8 text (character {exc.start + 1} is {exc.object[exc.start]!r}, "
                          "an undecodable byte); give the prompt in UTF-8") from None
    if tokens < 0:
        raise ConfigError(f"--tokens must be >= 0 (got {tokens})")
    if not temperature >= 0:  # also refuses NaN
        raise ConfigError(f"--temperature must be >= 0, 0 meaning greedy (got {temperature})")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--top-k must be >= 1 (got {top_k})")
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed must be in [0, 2**64 - 1] (got {seed})")


def next_token(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """Ids (B, 1) drawn from logits (B, V): the argmax at temperature 0, else from softmax(logits / temperature)
    restricted to the `top_k` most likely ids. NonFiniteScores if a logit is NaN or infinite."""
    if not torch.isfinite(logits).all():  # argmax and softmax would make text of them, or fail in multinomial
        raise NonFiniteScores("the model's scores for the next token are not finite (NaN or infinity)")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    # Shifted so the largest is 0 before dividing: a tiny temperature then sends the others to -inf, never to
    # inf - inf = NaN (the softmax is the same). A temperature below float32's smallest normal number would
    # round to 0 in the division (0 / 0 = NaN); it samples as that number: greedy, but for exact ties.
    logits = logits.float()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / max(temperature, torch.finfo(torch.float32).tiny)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.inference_mode()
def generate(model: nn.Module, idx: Tensor, n: int, temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None, n_vocab: int | None = None) -> Tensor:
    """`idx` (B, T) followed by `n` new ids per row: (B, T + n).

    The model sees at most its `config.max_seq_len` latest ids (it has no positions beyond the length it
    trained at). `n_vocab` limits the draw to the tokenizer's ids: the padded rows of the head past it never
    appear in training text, so their logits mean nothing.
    """
    max_len = model.config.max_seq_len
    for _ in range(n):
        logits = model(idx[:, -max_len:])[:, -1, :]  # (B, V)
        if n_vocab is not None:
            logits = logits[:, :n_vocab]
        idx = torch.cat([idx, next_token(logits, temperature, top_k, generator)], dim=1)
    return idx


def sample_text(model: nn.Module, tokenizer: Tokenizer, prompt: str, tokens: int, temperature: float = 1.0,
                top_k: int | None = None, seed: int = 0) -> str:
    """The prompt followed by `tokens` sampled tokens, as text. The prompt and the new tokens are decoded
    together, so a character whose bytes the two share is whole. ConfigError if the model's scores are not
    finite (a diverged run's weights)."""
    check_sampling(prompt, tokens, temperature, top_k, seed)
    ids = tokenizer.encode(prompt)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    idx = torch.as_tensor(ids.astype("int64"), device=device)[None]  # (1, T)
    try:
        out = generate(model, idx, tokens, temperature, top_k, generator, n_vocab=tokenizer.n_vocab)
    except NonFiniteScores as exc:
        raise ConfigError(f"{exc}: the checkpoint's weights are NaN or too large, as after a divergence; "
                          "sample an earlier checkpoint of the run with --checkpoint") from None
    return tokenizer.decode(out[0])
