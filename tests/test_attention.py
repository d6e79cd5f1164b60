"""The two attention kernels of a block: SDPA with the distance bias as a mask (the reference), and FlexAttention
with a causal block mask and the bias as a score_mod. torch 2.13 runs FlexAttention on CPU only without gradients,
so forward equality is checked on CPU as the CUDA path will run it, and the backward through torch's own dense
reference implementation (see `flex_backward_on_cpu`)."""

import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from hlb_gpt.attention_check import compare_attention
from hlb_gpt.compare import group_key
from hlb_gpt.config import ConfigError, RunConfig, check_resumable
from hlb_gpt.device import attention_for, flex_available
from hlb_gpt.model import GPT, MAX_VALUE_HEAD, Block, GPTConfig, causal_block_mask, value_heads

pytestmark = [
    pytest.mark.skipif(not flex_available(), reason="this torch has no FlexAttention"),
    # Eager FlexAttention warns once that it is the unfused implementation; that is what these tests want.
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
]


def block_pair(width: int, qk_div: int, position_bias: float, seed: int = 0) -> tuple[Block, Block]:
    """Two blocks with the same weights, one per kernel."""
    torch.manual_seed(seed)
    sdpa = Block(GPTConfig(width=width, qk_div=qk_div, attention="sdpa"))
    flex = Block(GPTConfig(width=width, qk_div=qk_div, attention="flex"))
    with torch.no_grad():
        sdpa.position_bias.fill_(position_bias)
    flex.load_state_dict(sdpa.state_dict())
    return sdpa, flex


def qkv(T: int, qk: int, width: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, T, d, generator=g) for d in (qk, qk, width)]


def distance(T: int) -> torch.Tensor:
    pos = torch.arange(T, dtype=torch.int32)
    return pos[:, None] - pos[None, :]


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    """torch 2.13 refuses FlexAttention on CPU when an input needs a gradient, in its Python front end only.
    Lifting that check runs torch's dense reference forward and backward (the same score_mod, block mask and
    captured-buffer gradient path the CUDA kernels are generated from): it tests our score_mod's gradients,
    not the CUDA kernels."""
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda query, key, value: None)


# Lengths of the sequence warm-up (32, 64, ...) and lengths that are not multiples of the 128-token mask block.
LENGTHS = [1, 7, 32, 64, 100, 128, 200, 300]


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("width, qk_div, position_bias", [(40, 4, 0.3), (384, 8, 1.0), (384, 8, -2.0)])
def test_flex_forward_equals_sdpa_with_the_distance_bias(T, width, qk_div, position_bias):
    # width 384 splits the values into 3 heads of 128 sharing one query and key; width 40 is one head of 40.
    sdpa, flex = block_pair(width, qk_div, position_bias)
    q, k, v = qkv(T, width // qk_div, width)
    with torch.no_grad():
        expected, got = sdpa.attend(q, k, v, distance(T)), flex.attend(q, k, v, distance(T))
    assert got.shape == expected.shape == (2, T, width)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("T", [7, 100, 200])
@pytest.mark.parametrize("width, qk_div", [(40, 4), (384, 8)])
def test_flex_gradients_of_q_k_v_and_position_bias_equal_sdpa(flex_backward_on_cpu, T, width, qk_div):
    sdpa, flex = block_pair(width, qk_div, position_bias=0.5)
    weight = torch.randn(2, T, width, generator=torch.Generator().manual_seed(3))
    grads = []
    for block in (sdpa, flex):
        inputs = [t.requires_grad_() for t in qkv(T, width // qk_div, width)]
        (block.attend(*inputs, distance(T)) * weight).sum().backward()
        grads.append([t.grad for t in inputs] + [block.position_bias.grad])
    for name, expected, got in zip(["q", "k", "v", "position_bias"], *grads):
        assert got is not None, name
        scale = max(expected.abs().max().item(), 1.0)  # position_bias sums over B x T x T scores
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * scale, msg=name)


def test_a_flex_model_gives_the_sdpa_model_s_logits_with_the_same_weights():
    torch.manual_seed(0)
    sdpa = GPT(GPTConfig(vocab_size=96, depth=2, width=128, max_seq_len=160))
    flex = GPT(GPTConfig(vocab_size=96, depth=2, width=128, max_seq_len=160, attention="flex"))
    flex.load_state_dict(sdpa.state_dict())  # the kernel is not part of the weights: checkpoints carry over
    for T in (32, 64, 160):
        idx = torch.randint(0, 96, (2, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            torch.testing.assert_close(flex(idx), sdpa(idx), rtol=0, atol=1e-5)


def test_a_flex_model_trains_like_the_sdpa_model(flex_backward_on_cpu):
    torch.manual_seed(0)
    config = dict(vocab_size=96, depth=2, width=128, max_seq_len=100)
    sdpa, flex = GPT(GPTConfig(**config)), GPT(GPTConfig(**config, attention="flex"))
    flex.load_state_dict(sdpa.state_dict())
    g = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, 96, (2, 100), generator=g), torch.randint(0, 96, (2, 100), generator=g)
    for model in (sdpa, flex):
        model(idx, targets).backward()
    for (name, p), q in zip(sdpa.named_parameters(), flex.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_the_compiled_flex_model_follows_the_length_warm_up_without_graph_breaks():
    # What torch.compile sees on CUDA, down to the graph torch hands its kernel compiler (aot_eager runs torch's
    # reference for it here): the mask and the score_mod trace into one graph, lengths become dynamic after the
    # first, and dynamo does not warn about the lru_cache that serves eager calls.
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    config = dict(vocab_size=96, depth=2, width=128, max_seq_len=256)
    sdpa, flex = GPT(GPTConfig(**config)), GPT(GPTConfig(**config, attention="flex"))
    flex.load_state_dict(sdpa.state_dict())
    torch._dynamo.reset()
    counters.clear()  # they count over the process, earlier tests' compiles included
    compiled = torch.compile(flex, backend="aot_eager")
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for T in (32, 64, 128, 256, 100):  # the warm-up's lengths, then one that is not a multiple of 128
            idx = torch.randint(0, 96, (2, T), generator=torch.Generator().manual_seed(T))
            torch.testing.assert_close(compiled(idx), sdpa(idx), rtol=0, atol=1e-5)
    assert not counters["graph_break"], dict(counters["graph_break"])
    # The first length, then lengths within one 128-token mask block (torch specialises a single block), then the rest.
    assert counters["stats"]["unique_graphs"] <= 3
    assert not [w for w in caught if "lru_cache" in str(w.message)]
    torch._dynamo.reset()


def test_the_block_mask_is_built_once_per_length_and_device():
    cpu = torch.device("cpu")
    assert causal_block_mask(64, cpu) is causal_block_mask(64, cpu)
    assert causal_block_mask(100, cpu).shape[-2:] == (100, 100)
    assert causal_block_mask(100, cpu) is not causal_block_mask(64, cpu)


@pytest.mark.parametrize("width, heads", [(8, 1), (40, 1), (128, 1), (136, 2), (384, 3), (1024, 8), (1032, 12)])
def test_values_split_into_the_fewest_equal_heads_of_at_most_128_channels(width, heads):
    assert value_heads(width) == heads
    assert width % heads == 0 and width // heads <= MAX_VALUE_HEAD


def test_gpt_config_rejects_an_unknown_attention_naming_the_flag():
    with pytest.raises(ValueError, match="--attention"):
        GPTConfig(attention="flash")


# --------------------------------------------------------------------------- choosing the kernel for a run

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # attention_for reads only the device type


def test_auto_picks_flex_only_on_cuda_under_compile_with_wide_enough_queries():
    assert attention_for("auto", CUDA, compiled=True, qk_dim=48) == "flex"
    assert attention_for("auto", CUDA, compiled=False, qk_dim=48) == "sdpa"  # eager flex is unfused
    assert attention_for("auto", CUDA, compiled=True, qk_dim=8) == "sdpa"  # flex's kernels need >= 16
    assert attention_for("auto", CPU, compiled=True, qk_dim=48) == "sdpa"
    assert attention_for("sdpa", CUDA, compiled=True, qk_dim=48) == "sdpa"


def test_flex_is_refused_where_it_cannot_train_naming_the_flag():
    with pytest.raises(ConfigError, match="--attention flex needs a CUDA device"):
        attention_for("flex", CPU, compiled=False, qk_dim=48)
    with pytest.raises(ConfigError, match="--attention flex needs queries of at least 16"):
        attention_for("flex", CUDA, compiled=True, qk_dim=8)
    assert attention_for("flex", CUDA, compiled=False, qk_dim=16) == "flex"


def test_the_attention_setting_is_validated_and_is_not_a_resumable_change():
    with pytest.raises(ConfigError, match="--attention"):
        RunConfig(attention="flash")
    with pytest.raises(ConfigError, match="--attention flex"):
        RunConfig(task="modular", attention="flex")
    with pytest.raises(ConfigError, match="--attention"):
        check_resumable(RunConfig(attention="flex"), RunConfig(attention="sdpa").to_dict(), "runs/x")


def test_the_attention_kernel_does_not_split_a_configuration_in_compare():
    # The same computation by another kernel; a run recorded before --attention existed still pairs with one that
    # records it.
    before = {**RunConfig(dataset="mini").to_dict(), "resolved_device": "cpu"}
    del before["attention"]
    flex = {**RunConfig(dataset="mini", attention="flex").to_dict(), "resolved_device": "cpu",
            "resolved_attention": "flex"}
    assert group_key(before) == group_key(flex)


@pytest.mark.slow
def test_the_attention_benchmark_runs_on_cpu_and_prints_its_table():
    bench = Path(__file__).resolve().parents[1] / "bench" / "attention.py"
    out = subprocess.run([sys.executable, str(bench), "--device", "cpu", "--batch", "1", "--seq-len", "100",
                          "--repeats", "1", "--iters", "1", "--warmup", "1"],
                         capture_output=True, text=True, check=True, timeout=600).stdout
    rows = {tuple(line.split()[:2]): line for line in out.splitlines()[2:]}
    assert set(rows) == {(v, m) for v in ("sdpa", "flex", "flex-1head") for m in ("train", "eval")}, out
    assert "n/a: NotImplementedError" in rows["flex", "train"]  # no FlexAttention backward on CPU
    assert float(rows["flex", "eval"].split()[-2]) < 1e-5, out  # its output's max |difference| to SDPA's


# --------------------------------------------------------------------------- one mask per forward, shared

def test_a_compiled_flex_model_builds_one_block_mask_per_forward_for_all_its_blocks(monkeypatch):
    import torch.nn.attention.flex_attention as fa

    built = []
    create = fa.create_block_mask

    def counted(*args, **kwargs):
        built.append(args[3])  # the query length
        return create(*args, **kwargs)

    monkeypatch.setattr(fa, "create_block_mask", counted)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=96, depth=3, width=128, max_seq_len=64, attention="flex"))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(torch.randint(0, 96, (2, 64), generator=torch.Generator().manual_seed(0)))
    assert built == [64]  # once for the three blocks, not once per block
    torch._dynamo.reset()


# --------------------------------------------------------------------------- falling back to SDPA

def pick_flex(monkeypatch):
    """The lm task picks flex, as `--attention auto` does on CUDA under compile."""
    from hlb_gpt.tasks import lm

    monkeypatch.setattr(lm, "attention", lambda cfg, device, compile: "flex")


def small_run(tmp_path, **changes):
    return RunConfig(**{**dict(dataset="mini", preset="tiny", tokenizer="bytes", depth=1, width=16, seq_len=64,
                               batch_size=4, eval_tokens=2 * 64 + 1, checkpoint_every=0, device="cpu",
                               data_cache=str(tmp_path / "cache")), **changes})


def flex_failing_backend(gm, example_inputs):
    """dynamo's tracing-only backend, failing as Inductor might on a graph that holds FlexAttention."""
    if any("flex_attention" in str(node.target) for node in gm.graph.nodes):
        raise RuntimeError("forced flex compile failure")
    return gm.forward


def test_a_flex_model_whose_compile_fails_is_compiled_again_with_sdpa_saying_so_once(tmp_path, monkeypatch, caplog):
    # Not the same flex model eagerly, which materialises every score; the weights do not depend on the kernel.
    import logging

    from hlb_gpt import compiling
    from hlb_gpt.train import train

    cfg = small_run(tmp_path, compile=True, max_steps=3)
    sdpa = train(cfg.replace(compile=False), tmp_path / "sdpa", progress=False)
    pick_flex(monkeypatch)
    monkeypatch.setattr(compiling, "BACKEND", flex_failing_backend)
    with caplog.at_level(logging.WARNING, logger="hlb_gpt.compiling"):
        summary = train(cfg, tmp_path / "flex", progress=False)
    assert summary["status"] == "completed", summary["error"]
    assert summary["compiled"] is True and summary["compile_error"] is None
    assert summary["attention_fallback"].startswith("SDPA instead of FlexAttention: torch.compile failed (")
    assert "forced flex compile failure" in summary["attention_fallback"]
    warnings = [r.message for r in caplog.records if "torch.compile failed" in r.message]
    assert len(warnings) == 1 and warnings[0].startswith(
        "the model: torch.compile failed, compiling it again with SDPA instead of FlexAttention (")
    assert summary["final_val_loss"] == pytest.approx(sdpa["final_val_loss"], rel=1e-5)
    assert sdpa["attention_fallback"] is None


def test_non_finite_gradients_of_flex_below_one_block_send_short_lengths_to_sdpa_instead_of_diverging(
        tmp_path, monkeypatch, flex_backward_on_cpu):
    # Upstream, short bf16 compiled FlexAttention has given NaN gradients: every step of the T = 32 phase would be
    # skipped and the run end "diverged" at step 11. Here flex's gradients are made NaN; SDPA's are not.
    from hlb_gpt import model as model_module
    from hlb_gpt.train import train

    flex = model_module.flex_distance_attention

    def nan_gradients(*args, **kwargs):
        out = flex(*args, **kwargs)
        if out.requires_grad:
            out.register_hook(lambda grad: torch.full_like(grad, float("nan")))
        return out

    monkeypatch.setattr(model_module, "flex_distance_attention", nan_gradients)
    pick_flex(monkeypatch)
    cfg = small_run(tmp_path, compile=False, max_steps=25)
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["status"] == "completed", summary["error"]
    assert summary["attention_fallback"] == ("SDPA instead of FlexAttention below 128 tokens: non-finite gradients "
                                             "at length 32, step 1")
    assert math.isfinite(summary["final_val_loss"])


def test_non_finite_gradients_at_a_length_flex_serves_in_whole_blocks_still_diverge():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=96, depth=2, width=128, max_seq_len=256, attention="flex"))
    assert model.nonfinite_fallback(128, step=200) is None and model.attention_fallback is None
    assert model.nonfinite_fallback(64, step=3) == "SDPA instead of FlexAttention below 128 tokens"
    assert model.nonfinite_fallback(32, step=5) is None  # once: after that, SDPA's own NaNs count
    assert all(b.uses_flex(128) and not b.uses_flex(127) for b in model.blocks)
    sdpa = GPT(GPTConfig(vocab_size=96, depth=2, width=128, max_seq_len=256))
    assert sdpa.nonfinite_fallback(32, step=1) is None and sdpa.compile_fallback("error") is None


# --------------------------------------------------------------------------- the whole model, flex against SDPA

@pytest.mark.parametrize("T", [32, 64, pytest.param(1024, marks=pytest.mark.slow)])
def test_flex_s_dense_reference_gives_the_sdpa_model_s_loss_and_every_gradient_position_bias_included(T):
    # The warm-up's lengths (below one 128-token block) and the hlb preset's; the hlb block's shapes (3 value heads).
    agreement = compare_attention(T, "cpu", batch=1 if T > 128 else 2)
    names = {name for name, _ in GPT(GPTConfig(vocab_size=512, depth=2, width=384, max_seq_len=T)).named_parameters()}
    assert set(agreement.grad_errors) == names and {"blocks.0.position_bias", "blocks.1.position_bias"} <= names
    assert agreement.nonfinite == ()
    assert agreement.loss_error <= 1e-5 * agreement.sdpa_loss
    assert agreement.worst[1] < 1e-4, agreement.worst


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's kernels need a CUDA device")
@pytest.mark.parametrize("T", [32, 64, 1024])
def test_flex_s_compiled_cuda_kernels_give_the_sdpa_model_s_loss_and_every_gradient_in_bf16(T):
    agreement = compare_attention(T, "cuda", precision="bf16", compiled=True, batch=8)
    assert agreement.nonfinite == ()  # NaN gradients of short bf16 compiled flex are reported upstream
    assert agreement.loss_error <= 1e-2 * agreement.sdpa_loss
    assert agreement.worst[1] < 5e-2, agreement.worst


@pytest.mark.slow
def test_a_compiled_flex_model_recompiles_to_sdpa_below_one_block_after_the_fallback(monkeypatch):
    # The switch is a model attribute the compiled graph guards on: no stale flex graph serves short lengths.
    from hlb_gpt import model as model_module

    called = []
    flex = model_module.flex_distance_attention
    monkeypatch.setattr(model_module, "flex_distance_attention",
                        lambda q, *args, **kwargs: called.append(q.shape[1]) or flex(q, *args, **kwargs))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=96, depth=2, width=128, max_seq_len=256, attention="flex"))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    idx = torch.randint(0, 96, (2, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        compiled(idx[:, :32])
        assert len(called) == 2  # both blocks
        model.nonfinite_fallback(32, step=1)
        short, full = compiled(idx[:, :64]), compiled(idx)
        assert len(called) == 4  # the full length still by flex, 64 by SDPA
        expected = GPT(GPTConfig(vocab_size=96, depth=2, width=128, max_seq_len=256))
        expected.load_state_dict(model.state_dict())
        torch.testing.assert_close(short, expected(idx[:, :64]), rtol=0, atol=1e-5)
        torch.testing.assert_close(full, expected(idx), rtol=0, atol=1e-5)
    torch._dynamo.reset()
