import dataclasses
import math

import pytest
import torch

from hlb_gpt.model import GPT, GPTConfig, chunked_cross_entropy, pad_vocab
from hlb_gpt.optim import layer_index


def tiny(**overrides) -> GPTConfig:
    settings = dict(vocab_size=128, depth=2, width=32, max_seq_len=16)
    settings.update(overrides)
    return GPTConfig(**settings)


def build(config: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config)


def tokens(config: GPTConfig, batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=generator)


def expected_param_count(c: GPTConfig) -> int:
    qk, hidden = c.width // c.qk_div, c.expand * c.width
    per_block = (
        c.width  # norm weight
        + (2 * qk + 2 * hidden) * c.width  # expand
        + c.width * hidden  # project
        + 1  # position_bias
        + (c.width * c.width if c.gate != "none" else 0)  # gate
    )
    return 2 * c.vocab_size * c.width + c.depth * per_block + c.width  # embed + head, blocks, final norm


def test_default_config_is_the_46m_hlb_preset():
    config = GPTConfig()
    assert (config.vocab_size, config.depth, config.width) == (50304, 8, 384)
    n = GPT(config).num_params()
    assert n == expected_param_count(config) == 46_009_736
    assert 45e6 < n < 47e6


def test_pad_vocab_rounds_up_to_a_multiple_of_64():
    assert pad_vocab(50257) == 50304
    assert pad_vocab(256) == 256
    assert pad_vocab(257, multiple=8) == 264


def test_forward_returns_logits_of_shape_batch_time_vocab():
    config = tiny()
    logits = build(config)(tokens(config, batch=3, length=7))
    assert logits.shape == (3, 7, config.vocab_size)


def test_loss_at_init_is_a_float32_scalar_near_log_vocab():
    config = tiny(vocab_size=512, depth=4, width=64)
    idx = tokens(config, batch=4, length=16)
    loss = build(config)(idx, targets=tokens(config, batch=4, length=16, seed=2))
    assert loss.shape == () and loss.dtype == torch.float32
    assert abs(loss.item() - math.log(config.vocab_size)) < 0.5


def test_changing_a_token_leaves_logits_at_earlier_positions_unchanged():
    config = tiny()
    model = build(config)
    idx = tokens(config, batch=1, length=12)
    changed = idx.clone()
    t = 7
    changed[0, t] = (idx[0, t] + 1) % config.vocab_size
    before, after = model(idx), model(changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, t:], before[:, t:])


def test_attention_bias_is_zero_on_the_diagonal_falls_linearly_with_distance_and_masks_the_future():
    model = build(tiny())
    block = model.blocks[0]
    bias = block.attention_bias(model.distance[:5, :5])
    slope = torch.nn.functional.softplus(torch.tensor(1.0))
    assert torch.all(torch.isneginf(bias.triu(1)[torch.ones(5, 5).triu(1).bool()]))
    torch.testing.assert_close(bias.diagonal(), torch.zeros(5))
    torch.testing.assert_close(bias[4, :5], -slope * torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0]))


def test_position_bias_scalar_receives_a_finite_nonzero_gradient():
    config = tiny()
    model = build(config)
    model(tokens(config), targets=tokens(config, seed=2)).backward()
    for block in model.blocks:
        grad = block.position_bias.grad
        assert grad is not None and torch.isfinite(grad) and grad != 0


def test_larger_position_bias_makes_attention_more_local():
    # One block: only attention mixes positions, so the influence of token 0 on the logits at
    # position 5 measures how far the block attends.
    config = tiny(depth=1)
    model = build(config)
    idx = tokens(config, batch=1, length=6)
    changed = idx.clone()
    changed[0, 0] = (idx[0, 0] + 1) % config.vocab_size

    def influence_of_first_token(m: float) -> float:
        with torch.no_grad():
            model.blocks[0].position_bias.fill_(m)
            return (model(changed)[0, 5] - model(idx)[0, 5]).abs().max().item()

    wide, local = influence_of_first_token(-10.0), influence_of_first_token(30.0)
    assert wide > 0
    assert local < 1e-6 * wide


def test_sequences_shorter_than_max_seq_len_work():
    config = tiny(max_seq_len=16)
    model = build(config)
    for length in (1, 5, 16):
        assert model(tokens(config, length=length)).shape == (2, length, config.vocab_size)


def test_sequence_longer_than_max_seq_len_is_rejected_naming_the_flag():
    config = tiny(max_seq_len=16)
    with pytest.raises(ValueError, match="--seq-len"):
        build(config)(tokens(config, length=17))


def test_distance_table_is_a_buffer_outside_state_dict_that_moves_with_the_model():
    model = build(tiny())
    assert "distance" in dict(model.named_buffers())
    assert "distance" not in model.state_dict()
    model.to(torch.float64)
    assert model.distance.dtype == torch.int32  # an integer table stays exact whatever the model dtype


@pytest.mark.parametrize("gate", ["relu", "sigmoid"])
def test_gated_blocks_add_one_width_square_matrix_per_block_and_train(gate):
    plain_config, gated_config = tiny(), tiny(gate=gate)
    gated = build(gated_config)
    extra = gated.num_params() - build(plain_config).num_params()
    assert extra == gated_config.width**2 * gated_config.depth
    assert gated.num_params() == expected_param_count(gated_config)
    loss = gated(tokens(gated_config), targets=tokens(gated_config, seed=2))
    loss.backward()
    assert torch.isfinite(loss)
    for i, block in enumerate(gated.blocks):
        assert block.gate.shape == (gated_config.width, gated_config.width)
        assert block.gate.grad is not None and block.gate.grad.abs().sum() > 0
        assert f"blocks.{i}.gate" in dict(gated.named_parameters())


def test_ungated_model_has_no_gate_parameters():
    names = [name for name, _ in build(tiny(gate="none")).named_parameters()]
    assert not any("gate" in name for name in names)


def test_parameter_names_are_the_ones_the_optimizer_groups_by():
    names = {name for name, _ in build(tiny(depth=2)).named_parameters()}
    assert names == {
        "embed.weight",
        *(f"blocks.{i}.{p}" for i in range(2) for p in ("norm.weight", "expand", "project", "position_bias")),
        "norm.weight",
        "head.weight",
    }


def test_output_projection_init_shrinks_with_depth():
    shallow, deep = build(tiny(width=64, depth=2)), build(tiny(width=64, depth=4))
    shallow_std, deep_std = shallow.blocks[0].project.std().item(), deep.blocks[0].project.std().item()
    assert shallow_std / deep_std == pytest.approx(2.0, rel=0.05)
    assert deep_std == pytest.approx(1 / math.sqrt(64) / 2 / 4, rel=0.05)


def test_embedding_gradient_of_a_repeated_token_is_summed_over_its_occurrences():
    config = tiny()
    model = build(config)
    idx = torch.tensor([[3, 5, 3, 7, 3, 9]])
    captured = {}

    def keep_output_grad(module, inputs, output):
        output.retain_grad()
        captured["x"] = output

    model.embed.register_forward_hook(keep_output_grad)
    model(idx, targets=torch.roll(idx, -1, dims=1)).backward()
    dx = captured["x"].grad[0]  # (T, C)
    torch.testing.assert_close(model.embed.weight.grad[3], dx[[0, 2, 4]].sum(0))
    torch.testing.assert_close(model.embed.weight.grad[5], dx[1])


def test_bf16_autocast_on_cpu_gives_a_finite_float32_loss():
    config = tiny()
    model = build(config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens(config), targets=tokens(config, seed=2))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
def test_compiled_model_matches_eager_loss_and_gradients():
    config = tiny(gate="sigmoid")
    model = build(config)
    idx, targets = tokens(config), tokens(config, seed=2)
    eager = model(idx, targets)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    compiled_loss = torch.compile(model)(idx, targets)
    compiled_grads = torch.autograd.grad(compiled_loss, list(model.parameters()))
    assert abs(compiled_loss.item() - eager.item()) < 1e-4
    for e, c in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(c, e, rtol=1e-3, atol=1e-5)


def test_layer_index_maps_the_models_embedding_blocks_and_head_to_layers():
    depth = 3
    model = build(tiny(depth=depth))
    layers = {name: layer_index(name, depth) for name, _ in model.named_parameters()}
    assert layers["embed.weight"] == 0
    assert layers["blocks.0.expand"] == 1
    assert layers["blocks.2.position_bias"] == 3
    assert layers["norm.weight"] == layers["head.weight"] == depth + 1
    assert layers["blocks.1.norm.weight"] == 2  # a block's own norm belongs to the block


def test_layer_index_sees_through_compile_and_ddp_prefixes():
    assert layer_index("_orig_mod.blocks.4.project", 8) == 5
    assert layer_index("module._orig_mod.head.weight", 8) == 9


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"width": 100}, r"--width must be divisible by 8 \(got 100\)"),
        ({"width": 96, "qk_div": 7}, r"--width must be divisible by 7 \(got 96\)"),
        ({"depth": 0}, r"--depth must be a positive integer \(got 0\)"),
        ({"width": -64}, r"--width must be a positive integer"),
        ({"max_seq_len": 0}, r"--seq-len must be a positive integer"),
        ({"depth": 2.5}, r"--depth must be a positive integer"),
        ({"gate": "tanh"}, r"--gate must be one of none, relu, sigmoid \(got 'tanh'\)"),
    ],
)
def test_invalid_config_is_rejected_naming_the_flag(overrides, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**overrides)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_vocabulary_chunked_loss_equals_one_cross_entropy_over_all_classes(dtype):
    generator = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(300, 1000, generator=generator)).to(dtype)
    targets = torch.randint(0, 1000, (300,), generator=generator)
    whole = torch.nn.functional.cross_entropy(logits.float(), targets)
    for chunk in (1000, 128, 7):  # one slice, slices that divide unevenly, many small slices
        got = chunked_cross_entropy(logits, targets, chunk=chunk)
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(whole.item(), rel=1e-6)


def test_evaluation_without_autograd_gives_the_training_loss_and_training_keeps_the_single_call():
    config = tiny()
    model, idx = build(config), tokens(config)
    targets = tokens(config, seed=2)
    trained = model(idx, targets)
    whole = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    assert torch.equal(trained, whole)  # bit for bit: the golden curves depend on it
    with torch.no_grad():
        assert model(idx, targets).item() == pytest.approx(trained.item(), rel=1e-6)


def test_the_chunked_loss_holds_less_than_one_float32_copy_of_bf16_logits():
    from hlb_gpt.device import PeakMemory

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1024, 32768, generator=generator).to(torch.bfloat16)  # 64 MiB; 128 MiB in float32
    targets = torch.randint(0, 32768, (1024,), generator=generator)
    copy = logits.numel() * 4

    def extra(loss_fn) -> int:
        peak = PeakMemory.start(torch.device("cpu"))
        assert peak.kind == "vm_hwm_since_run_start"
        start = peak.read()
        loss_fn()
        return peak.read() - start

    assert extra(lambda: torch.nn.functional.cross_entropy(logits.float(), targets)) > 1.5 * copy
    assert extra(lambda: chunked_cross_entropy(logits, targets)) < 0.75 * copy


# ------------------------------------------------------------------------------------------ the one model builder


@pytest.fixture
def narrow_builder(monkeypatch):
    """Every binding of `model.gpt_config` in the package replaced by one that builds a narrower MLP (expand 1)
    and records the settings it was given: a path that builds its own GPTConfig misses the change."""
    import sys

    import hlb_gpt.finetune, hlb_gpt.tasks.lm, hlb_gpt.train, hlb_gpt.trained  # noqa: E401, F401 (bind them all)
    from hlb_gpt import model

    original, seen = model.gpt_config, []

    def narrow(settings, attention="sdpa"):
        seen.append(settings)
        return dataclasses.replace(original(settings, attention), expand=1)

    for name, module in list(sys.modules.items()):
        if name.startswith("hlb_gpt") and getattr(module, "gpt_config", None) is original:
            monkeypatch.setattr(module, "gpt_config", narrow)
    return seen


SETTINGS = [dict(tokenizer="bytes"), dict(tokenizer="gpt2"), dict(tokenizer="bytes", gate="relu"),
            dict(tokenizer="gpt2", gate="sigmoid", lora_rank=2, lora_targets="in,out,gate"),
            dict(tokenizer="bytes", train_only="head,norms")]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_counting_and_building_a_model_go_through_gpt_config(narrow_builder, tmp_path, settings):
    from hlb_gpt.config import RunConfig
    from hlb_gpt.distributed import Dist
    from hlb_gpt.finetune import count_trainable
    from hlb_gpt.model import gpt_config
    from hlb_gpt.tasks.lm import LanguageModel
    from hlb_gpt.train import count_params

    cfg = RunConfig(dataset="mini", preset="tiny", depth=1, width=16, seq_len=32, device="cpu",
                    data_cache=str(tmp_path), **settings)
    narrow = dataclasses.replace(gpt_config(cfg), expand=1)  # the unpatched builder, as this module bound it
    with torch.device("meta"):
        plain = GPT(narrow).num_params()
    fine_tunes = bool(cfg.lora_rank or cfg.train_only)
    assert count_params(cfg) == (count_trainable(cfg) if fine_tunes else plain)
    assert count_trainable(cfg) < plain if fine_tunes else count_trainable(cfg) == plain
    assert narrow_builder and all(s is cfg for s in narrow_builder)
    task = LanguageModel(cfg, torch.device("cpu"), Dist(), False)
    assert task.build_model().config == narrow
    assert LanguageModel.vocab_size(cfg) == narrow.vocab_size


def test_a_recorded_config_and_its_run_config_give_the_same_architecture():
    from hlb_gpt.config import RunConfig
    from hlb_gpt.model import gpt_config

    cfg = RunConfig(preset="tiny", tokenizer="bytes", gate="relu")
    assert gpt_config(cfg.to_dict()) == gpt_config(cfg)
    old = {k: v for k, v in cfg.to_dict().items() if k != "gate"}  # recorded before --gate existed
    assert gpt_config(old) == gpt_config(cfg.replace(gate="none"))
    assert gpt_config(cfg, "flex").attention == "flex" and gpt_config(cfg).attention == "sdpa"


@pytest.mark.slow
def test_sample_and_export_read_a_run_back_with_the_builder_it_trained_with(narrow_builder, tmp_path):
    from hlb_gpt.trained import load_trained
    from tiny_runs import train_tiny

    run = train_tiny(tmp_path / "run", tmp_path / "cache", gate="sigmoid")
    trained = load_trained(run)  # weights of the expand-1 model fit only the architecture the builder gives
    assert trained.model.config.expand == 1 and trained.model.config.gate == "sigmoid"
    assert any(isinstance(s, dict) for s in narrow_builder)  # the recorded config.json went through it
