"""The hlb GPT: embedding -> blocks of fused "latent attention" -> LayerNorm -> head.

Read bottom-up: config -> block -> model. Positions enter only through each block's learned distance bias;
all initialisation is in `GPT._init_weights`. See docs/DESIGN.md, section 2 (The model).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hlb_gpt.config import GATES

ATTENTIONS = ("sdpa", "flex")
# FlexAttention's block: its mask and kernels work in tiles of this many query and key positions.
FLEX_BLOCK = 128
# FlexAttention's CUDA kernels pick their tiles by the query width and round the value width up to a power of
# two, so one 384-wide value head would carry 512-wide tiles; values are split into heads of at most this.
MAX_VALUE_HEAD = 128


def pad_vocab(n: int, multiple: int = 64) -> int:
    """Round a vocabulary size up to a multiple (50,257 -> 50,304) so the head's matmul tiles evenly."""
    return -(-n // multiple) * multiple


@dataclass(frozen=True)  # hashable: parameter counts are cached per architecture
class GPTConfig:
    vocab_size: int = 50304
    """Rows of the embedding and the head; pad with `pad_vocab` (the tokenizer's ids stay below it)."""
    depth: int = 8
    """Number of blocks (--depth)."""
    width: int = 384
    """Residual stream width (--width)."""
    max_seq_len: int = 1024
    """Longest sequence the model accepts; sizes the precomputed distance table (--seq-len)."""
    qk_div: int = 8
    """Queries and keys have width // qk_div channels."""
    expand: int = 2
    """Each GeGLU half (a and b) has expand * width channels."""
    gate: str = "none"
    """Gate each block's output by act(W x) of its input: none, relu or sigmoid (--gate)."""
    attention: str = "sdpa"
    """Attention kernel: sdpa (reference, any device) or flex (FlexAttention, CUDA under torch.compile)."""

    def __post_init__(self) -> None:
        flags = {
            "vocab_size": "vocab_size",
            "depth": "--depth",
            "width": "--width",
            "max_seq_len": "--seq-len",
            "qk_div": "qk_div",
            "expand": "expand",
        }
        for field, flag in flags.items():
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} must be a positive integer (got {value!r})")
        if self.width % self.qk_div:
            raise ValueError(f"--width must be divisible by {self.qk_div} (got {self.width})")
        if self.gate not in GATES:
            raise ValueError(f"--gate must be one of {', '.join(GATES)} (got {self.gate!r})")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"--attention must be one of {', '.join(ATTENTIONS)} (got {self.attention!r})")


def gpt_config(settings: Any, attention: str = "sdpa") -> GPTConfig:
    """The architecture a run of `settings` trains: from its RunConfig or its recorded config.json (a dict; runs
    recorded before --gate have no gate). The one place settings become a GPTConfig, so the model a run trains,
    counts, and `sample`/`export` read back are the same. The attention kernel is not a property of the weights
    (sdpa and flex compute the same function), so only training asks for another than the portable sdpa."""
    from hlb_gpt.data import get_tokenizer  # the model itself needs no data module, only this vocabulary size

    get = settings.get if isinstance(settings, Mapping) else functools.partial(getattr, settings)
    return GPTConfig(vocab_size=pad_vocab(get_tokenizer(get("tokenizer")).n_vocab), depth=get("depth"),
                     width=get("width"), max_seq_len=get("seq_len"), gate=get("gate", "none"), attention=attention)


def _causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return q_idx >= kv_idx


@functools.lru_cache(maxsize=32)
def _cached_causal_block_mask(T: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_causal, None, None, T, T, device=device)


def causal_block_mask(T: int, device: torch.device):
    """FlexAttention's causal BlockMask for length T, built once per (T, device) in eager mode. Under
    torch.compile it is traced into the graph instead (dynamo ignores lru_cache), where it costs a few
    elementwise kernels per forward."""
    if torch.compiler.is_compiling():
        return _cached_causal_block_mask.__wrapped__(T, device)
    return _cached_causal_block_mask(T, device)


def value_heads(width: int) -> int:
    """The fewest equal heads of at most MAX_VALUE_HEAD channels that `width` splits into."""
    return next(n for n in range(1, width + 1) if width % n == 0 and width // n <= MAX_VALUE_HEAD)


def flex_distance_attention(q: Tensor, k: Tensor, v: Tensor, position_bias: Tensor, heads: int | None = None,
                            block_mask: Any = None) -> Tensor:
    """Causal attention with the bias -softplus(m) * (i - j), by FlexAttention; equal to SDPA with
    `Block.attention_bias` as the mask. q, k (B, T, D) and v (B, T, C) -> (B, T, C).

    The bias is a float32 table by distance, read in the score_mod (where scores are float32 under bf16
    autocast too); the table is built from m by autograd outside, so m gets its gradient from the table's.
    v is split into `heads` heads (default `value_heads(C)`) sharing one query and key: every head's scores
    are the same, and the output is their concatenation, which is exactly single-head attention. `block_mask` is
    `causal_block_mask(T)`, built here unless the caller shares one between blocks.
    """
    from torch.nn.attention.flex_attention import flex_attention

    B, T, D = q.shape
    C = v.shape[-1]
    H = heads or value_heads(C)
    table = -F.softplus(position_bias.float()) * torch.arange(T, device=q.device, dtype=torch.float32)  # (T,)

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        # Masked entries of partial blocks are scored too: clamp so their lookup stays inside the table.
        return score + table[torch.clamp(q_idx - kv_idx, min=0)]

    if block_mask is None:
        block_mask = causal_block_mask(T, q.device)
    out = flex_attention(q.unsqueeze(1).expand(B, H, T, D), k.unsqueeze(1).expand(B, H, T, D),
                         v.view(B, T, H, C // H).transpose(1, 2),
                         score_mod=score_mod, block_mask=block_mask)  # (B, H, T, C // H)
    return out.transpose(1, 2).reshape(B, T, C)


class Block(nn.Module):
    """One fused latent-attention layer: x + project([u_local, attention(q, k, u_values)]).

    With `gate` relu or sigmoid, the update is multiplied elementwise by act(W x) before the
    residual add, where x is the block's input (the un-normalised residual stream) and W a
    bias-free width x width matrix: y = project(...) * act(x @ W.T); output x + y. The gate
    reads the same x the update is added to, so a block can decide per channel how much to
    write from what is already in the stream.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.qk_dim = config.width // config.qk_div
        self.hidden = config.expand * config.width  # channels of each GeGLU half
        self.width = config.width
        self.norm = nn.LayerNorm(config.width, bias=False)
        self.expand = nn.Parameter(torch.empty(2 * self.qk_dim + 2 * self.hidden, config.width))
        self.project = nn.Parameter(torch.empty(config.width, self.hidden))
        # m in softplus(m) * -distance: each block learns its own attention range.
        self.position_bias = nn.Parameter(torch.tensor(1.0))
        self.gate = nn.Parameter(torch.empty(config.width, config.width)) if config.gate != "none" else None
        self.gate_act = {"none": None, "relu": F.relu, "sigmoid": torch.sigmoid}[config.gate]
        self.flex = config.attention == "flex"
        self.flex_from = 0  # the shortest length FlexAttention serves; SDPA shorter ones (`GPT.fall_back_to_sdpa`)

    def attention_bias(self, distance: Tensor) -> Tensor:
        """Additive mask from a (T, T) table of i - j: -softplus(m) * (i - j) on and below the diagonal, -inf above."""
        bias = -F.softplus(self.position_bias) * distance  # (T, T)
        # masked_fill, not a multiply by an infinite table: its backward gives the masked entries
        # a zero gradient, where 0 * inf would make the gradient of m NaN.
        return bias.masked_fill(distance < 0, float("-inf"))

    def uses_flex(self, T: int) -> bool:
        return self.flex and T >= self.flex_from

    def attend(self, q: Tensor, k: Tensor, v: Tensor, distance: Tensor, block_mask: Any = None) -> Tensor:
        """One head of causal attention with the distance bias: q, k (B, T, qk_dim), v (B, T, C) -> (B, T, C).
        `block_mask`: FlexAttention's causal mask for T, when the model shares one between its blocks."""
        if self.uses_flex(q.shape[1]):  # changes only by a fallback: a compiled graph guards on it
            return flex_distance_attention(q, k, v, self.position_bias, block_mask=block_mask)
        # The head axis is made explicit (B, 1, T, ·) because SDPA's fused kernels accept only 4-D
        # inputs; the mask follows q's dtype (bf16 under autocast) for the same reason.
        mask = self.attention_bias(distance).to(q.dtype)
        return F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), attn_mask=mask).squeeze(1)

    def forward(self, x: Tensor, distance: Tensor, block_mask: Any = None) -> Tensor:
        h = self.norm(x)  # (B, T, C)
        q, k, a, b = F.linear(h, self.expand).split((self.qk_dim, self.qk_dim, self.hidden, self.hidden), dim=-1)
        u = a * F.gelu(b)  # (B, T, hidden)
        u_local, v = u.split((self.hidden - self.width, self.width), dim=-1)  # (B, T, hidden - C), (B, T, C)
        att = self.attend(q, k, v, distance, block_mask)  # (B, T, C)
        y = F.linear(torch.cat([u_local, att], dim=-1), self.project)  # (B, T, C)
        if self.gate is not None:  # fixed at construction, so no branch in the compiled graph
            y = y * self.gate_act(F.linear(x, self.gate))
        return x + y


def chunked_cross_entropy(logits: Tensor, targets: Tensor, chunk: int = 8192) -> Tensor:
    """The mean cross-entropy of logits (N, V) in float32, as `F.cross_entropy(logits.float(), targets)`, with at
    most `chunk` classes in float32 at a time.

    `F.cross_entropy(logits.float())` holds two float32 copies of the logits (the cast and the log-softmax), on
    top of the bf16 logits themselves: 3 GB per copy for 16k tokens of a 50k vocabulary. Here the log-sum-exp is
    taken one slice of the vocabulary at a time and the slices' results combined. Training keeps the single
    call, whose rounding the golden curves pin and whose backward needs the log-softmax anyway.
    """
    lse = torch.stack([torch.logsumexp(logits[:, i:i + chunk].float(), dim=-1)
                       for i in range(0, logits.shape[-1], chunk)], dim=-1).logsumexp(dim=-1)  # (N,)
    picked = logits.gather(-1, targets[:, None]).squeeze(-1).float()  # (N,)
    return (lse - picked).mean()


class GPT(nn.Module):
    """Token embedding -> blocks -> LayerNorm -> head (untied, no positional embedding)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        # Not hlb-gpt's scale_grad_by_freq: averaging a token's gradient over its occurrences in the
        # *micro*-batch would make gradient accumulation and DDP shards differ from one big batch.
        self.embed = nn.Embedding(config.vocab_size, config.width)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width, bias=False)
        self.head = nn.Linear(config.width, config.vocab_size, bias=False)
        # distance[i, j] = i - j, built once and sliced per forward. An integer buffer keeps the
        # table exact whatever dtype the model is cast to; non-persistent keeps it out of state_dict.
        pos = torch.arange(config.max_seq_len, dtype=torch.int32)
        self.register_buffer("distance", pos[:, None] - pos[None, :], persistent=False)
        self.attention_fallback: str | None = None  # why the model left FlexAttention, if it did
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Every initial value in one place, scaled by width, expand factor and depth as in hlb-gpt."""
        c = self.config
        unit = 1.0 / math.sqrt(c.width)  # keeps a fan-in-`width` matmul's output near its input's scale
        nn.init.normal_(self.embed.weight, std=0.25 * unit)
        nn.init.normal_(self.head.weight, std=0.5 * unit)  # small logits: loss starts near ln(vocab)
        for block in self.blocks:
            nn.init.normal_(block.expand, std=0.5 * unit / c.expand)
            # Each block adds its output to the same residual stream; shrinking the output projection
            # with depth keeps the stream's scale at the end roughly independent of the number of blocks.
            nn.init.normal_(block.project, std=unit / c.expand / c.depth)
            block.position_bias.fill_(1.0)
            if block.gate is not None:
                # Fan-in scaling: W x has the scale of the residual stream x itself, so the gate's
                # input does not grow with width and a sigmoid gate starts unsaturated at ~0.5.
                # A relu gate starts ~x-sized (~0.005 at width 384), so gated blocks begin nearly off.
                nn.init.normal_(block.gate, std=unit)
        for norm in [self.norm, *(block.norm for block in self.blocks)]:
            nn.init.ones_(norm.weight)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> Tensor:
        """Logits (B, T, vocab) for token ids idx (B, T); with targets (B, T), the mean cross-entropy (float32)."""
        T = idx.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's max_seq_len {self.config.max_seq_len} (--seq-len)")
        distance = self.distance[:T, :T]  # (T, T)
        # One causal block mask for every block: under torch.compile it is computed in the graph at each forward.
        block_mask = causal_block_mask(T, idx.device) if any(b.uses_flex(T) for b in self.blocks) else None
        x = self.embed(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x, distance, block_mask)
        logits = self.head(self.norm(x))  # (B, T, V)
        if targets is None:
            return logits
        if not torch.is_grad_enabled():  # evaluation: no float32 copy of the whole logits
            return chunked_cross_entropy(logits.flatten(0, 1), targets.flatten())
        # In float32 even under bf16 autocast: log-softmax over 50k classes loses too much in bf16.
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def fall_back_to_sdpa(self, reason: str, below: int | None = None) -> str | None:
        """Attend with SDPA instead of FlexAttention for sequences shorter than `below` tokens (every length when
        None); record the change and `reason` in `attention_fallback`, and return the change, or None when flex
        served none of those lengths. The weights are the same for both kernels, so nothing else changes."""
        blocks = [b for b in self.blocks if b.flex and (below is None or b.flex_from < below)]
        if not blocks:
            return None
        for block in blocks:
            block.flex, block.flex_from = (False, 0) if below is None else (True, below)
        change = "SDPA instead of FlexAttention" + (f" below {below} tokens" if below is not None else "")
        self.attention_fallback = f"{change}: {reason}"
        return change

    def compile_fallback(self, error: str) -> str | None:
        """After a compile error: the flex kernels are the likeliest cause, and eager flex the slowest attention
        (it materialises every score), so SDPA replaces them and the model is compiled again."""
        return self.fall_back_to_sdpa(f"torch.compile failed ({error})")

    def nonfinite_fallback(self, T: int, step: int) -> str | None:
        """After non-finite gradients at step `step` of length T: where flex attended a sequence shorter than one
        of its blocks (short bf16 compiled FlexAttention has given NaN gradients upstream), SDPA takes every
        length below a block. None when it did not apply: the step is then counted like any other."""
        if T >= FLEX_BLOCK:
            return None
        return self.fall_back_to_sdpa(f"non-finite gradients at length {T}, step {step}", below=FLEX_BLOCK)

    def num_params(self) -> int:
        """All parameters, embedding and head included (they are separate matrices)."""
        return sum(p.numel() for p in self.parameters())
