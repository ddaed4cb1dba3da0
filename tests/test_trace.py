"""`qlora-kit estimate --trace`: the bytes one real training step allocates, counted on the meta device."""

import json

import pytest
import torch

from qlora_kit.cli import main
from qlora_kit.config import load_recipe
from qlora_kit.estimate import SHAPES, estimate, find_shape, shape_from_config
from qlora_kit.trace import BLOCK, MemoryTrace, trace_step

from conftest import make_tiny_model


def test_the_tracker_counts_live_storages_rounded_to_the_allocator_s_blocks():
    """Against arithmetic: the peak is the largest sum of live storages, views cost nothing, frees count."""
    model, optimizer = torch.nn.Linear(2, 2), torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1)
    tracker = MemoryTrace(model, optimizer, [])
    base = tracker.device_bytes  # the model's parameters: 2 storages of one block each
    assert base == 2 * BLOCK
    with tracker:
        a = torch.empty(1000, device="meta")  # 4000 bytes: 8 blocks
        view = a[:10].view(2, 5)  # noqa: F841 (a view of a: no new storage)
        b = torch.empty(10, 10, dtype=torch.bfloat16, device="meta")  # 200 bytes: one block
        assert tracker.device_bytes == base + 8 * BLOCK + BLOCK
        del b
        assert tracker.device_bytes == base + 8 * BLOCK
        c = torch.empty(3000, dtype=torch.uint8, device="meta")  # 3000 bytes: 6 blocks
    tracker.close()
    assert tracker.peak == base + 8 * BLOCK + 6 * BLOCK and c.numel() == 3000


def test_a_tiny_model_s_step_is_traced_with_its_real_4bit_layout(tmp_path):
    model_dir = make_tiny_model(tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    recipe = load_recipe(None, ["train.seq_len=64", "train.micro_batch_size=2", "lora.r=4"])
    trace = trace_step(recipe, config)
    # The 4-bit bytes bitsandbytes keeps for this model (codes, 8-bit scales, their fp32 scales, code tables)
    from qlora_kit.model import load_quantized

    real = load_quantized(model_dir, recipe.quant, torch.device("cpu")).model
    expected = 0
    for m in real.modules():
        if type(m).__name__ == "Linear4bit":
            state = m.weight.quant_state
            for t in (m.weight.data, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code):
                expected += -(-t.untyped_storage().nbytes() // BLOCK) * BLOCK
    assert trace.parts["4-bit weights"] == expected
    assert trace.peak >= sum(trace.parts.values()) * 0.999 and trace.where.split(",")[0] in (
        "forward", "backward", "recompute", "clip", "optimizer")


def test_offload_keeps_at_most_two_layers_on_the_device(tmp_path):
    from qlora_kit.model_paths import save_tiny_random

    model_dir = save_tiny_random(tmp_path / "m", num_hidden_layers=6)
    config = json.loads((model_dir / "config.json").read_text())
    recipe = load_recipe(None, ["train.seq_len=64", "train.micro_batch_size=2", "lora.r=4", "train.offload_base=true"])
    trace = trace_step(recipe, config)
    assert trace.resident_layers == 2 and trace.host > 0
    assert trace.parts["4-bit weights"] <= 2 * trace.host / 6 * 1.01  # two of the six layers' 4-bit bytes


def test_cli_prints_the_trace_beside_the_estimate(capsys):
    assert main(["estimate", "recipes/tiny-random.yaml", "train.seq_len=64", "--trace"]) == 0
    out = capsys.readouterr().out
    assert "estimated peak memory" in out and "traced peak" in out and "temporaries" in out


# Qwen3-30B-A3B's 48 layers of 128 experts take ~75 s to trace on a 2-core CPU; every layer is the same, so a
# quarter of them checks the same parts in a quarter of the time.
FEWER_LAYERS = {"qwen3-30b-a3b": 12}


@pytest.mark.slow
@pytest.mark.parametrize("recipe_name", ["llama-3.1-8b", "llama-3.1-70b-48gb", "llama-3.1-70b-24gb-offload",
                                         "mixtral-8x7b", "qwen3-30b-a3b"])
def test_trace_and_estimate_agree(recipe_name):
    """The formula and the traced step of the recipes' largest shapes: the device total within 10%, each part
    within 20% (or 1% of the total, for the small ones). The estimate's CUDA context and allocator slack are
    left out: nothing allocates them."""
    recipe = load_recipe(f"recipes/{recipe_name}.yaml")
    shape = find_shape(recipe)
    if recipe_name in FEWER_LAYERS:
        shape = shape_from_config({**shape.config, "num_hidden_layers": FEWER_LAYERS[recipe_name]}, shape.name)
    assert (SHAPES / "llama-3.1-70b.json").is_file()
    trace = trace_step(recipe, shape.config)
    est = {k: v for k, v in estimate(recipe, shape).parts.items() if k not in ("allocator slack", "CUDA context")}
    est["4-bit weights"] += est.pop("4-bit expert weights", 0)  # the trace counts every 4-bit byte as one part
    total = sum(est.values())
    assert abs(trace.peak - total) <= 0.10 * total, (trace.peak, total)
    traced = dict(trace.parts)
    traced["activations"] = traced.pop("saved for backward") + traced.pop("temporaries")
    for part, size in est.items():
        assert abs(traced[part] - size) <= max(0.2 * size, 0.01 * total), (part, traced[part], size)
    if recipe.train.offload_base:
        assert trace.resident_layers == 2
