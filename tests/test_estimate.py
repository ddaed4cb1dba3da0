"""The memory estimator and `train --dry-run`: counts checked against transformers and bitsandbytes."""

import json
import re
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

from qlora_kit.cli import main
from qlora_kit.config import load_recipe
from qlora_kit.estimate import (
    SHAPES,
    Shape,
    estimate,
    find_shape,
    largest_fitting,
    lora_parameter_count,
    parse_bytes,
    shape_from_config,
)

RECIPES = sorted(Path(__file__).parent.parent.glob("recipes/*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_dry_runs(recipe, capsys, monkeypatch):
    monkeypatch.chdir(recipe.parent.parent)  # recipes name their data relative to the repository
    assert main(["train", str(recipe.relative_to(recipe.parent.parent)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "total" in out and "4-bit weights" in out


def test_dry_run_fails_like_the_run_would(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  path: smollm2-135m\ndata:\n  path: missing.jsonl\n")
    assert main(["train", str(recipe), "--dry-run"]) == 2
    assert "'data.path': not found: missing.jsonl" in capsys.readouterr().err


def test_estimate_70b_on_48gb_prints_a_breakdown(capsys):
    root = Path(__file__).parent.parent
    assert main(["estimate", str(root / "recipes/llama-3.1-70b-48gb.yaml"), "--gpu-memory", "48GiB"]) == 0
    out = capsys.readouterr().out
    for part in ("4-bit weights", "embeddings, head, norms", "LoRA weights", "LoRA gradients", "optimizer states",
                 "activations", "CUDA context", "total"):
        assert part in out, part
    assert "fits in 48.00 GiB" in out and "largest that fit: train.micro_batch_size=" in out


@pytest.mark.parametrize("file", sorted(SHAPES.glob("*.json")), ids=lambda p: p.stem)
def test_shipped_shapes_count_what_transformers_builds(file):
    """Parameter counts of each shipped shape equal those of the model transformers builds from it (on meta)."""
    config = json.loads(file.read_text())["config"]
    shape = shape_from_config(config, file.stem)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    model.tie_weights()  # as loading does; parameters() then counts a tied head once
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in n)
    experts = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 3)  # MoE: all quantized
    total = sum(p.numel() for p in model.parameters())
    assert shape.quantized_params == linear + experts
    assert shape.quantized_params + shape.dense_params == total


def test_four_bit_bytes_match_bitsandbytes():
    """4.127 bits a weight with double quantization, 4.5 without: the bytes bitsandbytes actually keeps."""
    weight = torch.randn(1024, 4096)
    recipe = load_recipe(None, [])
    for double in (True, False):
        p = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=double,
                              blocksize=64).to("cpu")
        state = p.quant_state
        actual = p.data.numel() * p.data.element_size() + state.absmax.numel() * state.absmax.element_size()
        if double:
            actual += state.state2.absmax.numel() * state.state2.absmax.element_size()
        # four 1024 x 1024 linears = the weight's 4M parameters
        shape = Shape("one", vocab_size=1, hidden_size=1024, intermediate_size=0, num_layers=1, num_heads=1,
                      num_kv_heads=1, head_dim=1024, max_position_embeddings=4096,
                      linears={f"l{i}": (1024, 1024) for i in range(4)}, dense_params=0)
        recipe.quant.double_quant = double
        predicted = estimate(recipe, shape).parts["4-bit weights"]
        assert abs(predicted - actual) <= 0.001 * actual, (double, predicted, actual)


def test_lora_parameter_count_matches_our_layers(tiny_llama):
    from qlora_kit.train import build_model

    for targets in ("all-linear", ["q_proj", "v_proj"]):
        overrides = [f"model.path={tiny_llama}", "lora.r=4"]
        if targets != "all-linear":
            overrides.append(f"lora.target_modules={json.dumps(targets)}")
        recipe = load_recipe(None, overrides)
        model = build_model(recipe, torch.device("cpu")).model
        built = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert lora_parameter_count(find_shape(recipe), 4, recipe.lora.target_modules) == built


def test_largest_fitting_is_the_boundary():
    recipe = load_recipe(None, ["model.path=meta-llama/Llama-3.1-8B", "train.seq_len=2048"])
    shape = find_shape(recipe)
    budget = parse_bytes("24GiB")
    mb, seq = largest_fitting(recipe, shape, budget)

    def total(micro_batch_size, seq_len):
        trial = load_recipe(None, [f"train.micro_batch_size={micro_batch_size}", f"train.seq_len={seq_len}"])
        return estimate(trial, shape).total

    assert mb >= 1 and total(mb, 2048) <= budget < total(mb + 1, 2048)
    assert total(recipe.train.micro_batch_size, seq) <= budget < total(recipe.train.micro_batch_size, seq + 256)


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("80 GB") == 80 * 10**9
    assert parse_bytes("1.5g") == 1_500_000_000
    with pytest.raises(Exception, match="--gpu-memory"):
        parse_bytes("lots")


GPU_RECIPES = [r for r in RECIPES if "Expected peak memory" in r.read_text()]


@pytest.mark.parametrize("recipe", GPU_RECIPES, ids=lambda p: p.stem)
def test_recipe_headers_quote_the_current_estimate(recipe, capsys):
    """Each GPU recipe's header quotes `qlora-kit estimate`'s total for the command it gives: never stale."""

    text = recipe.read_text()
    quoted = float(re.search(r"Expected peak memory: ([0-9.]+) GiB", text).group(1))
    command = re.search(r"#\s+qlora-kit estimate (\S+) (.*)", text)
    args = ["estimate", str(recipe), *command.group(2).split()]
    assert main(args) == 0
    total = float(re.search(r"total\s+([0-9.]+) GiB", capsys.readouterr().out).group(1))
    assert total == quoted


def test_qwen3_moe_on_24gb_fits_with_experts_in_4bit(capsys):
    """The issue's acceptance check: Qwen3-30B-A3B's recipe fits 24 GiB, experts counted in 4 bits."""
    root = Path(__file__).parent.parent
    assert main(["estimate", str(root / "recipes/qwen3-30b-a3b.yaml"), "--gpu-memory", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert "30.53 B parameters (29.90 B in 4-bit)" in out and "3.35 B parameters active a token" in out
    assert "4-bit expert weights" in out and "fits in 24.00 GiB" in out


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_moe_lora_count_equals_what_training_builds(tiny_moe, arch):
    """The estimator's LoRA parameters on an MoE model (one pair per expert) are those training allocates."""
    from qlora_kit.train import build_model

    path = tiny_moe[arch, "fused"]
    shape = shape_from_config(json.loads((path / "config.json").read_text()), arch)
    for targets in ("all-linear", "[experts]", "[q_proj, experts.down_proj]"):
        recipe = load_recipe(None, [f"model.path={path}", "lora.r=4", f"lora.target_modules={targets}"])
        model = build_model(recipe, torch.device("cpu")).model
        built = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        assert lora_parameter_count(shape, 4, recipe.lora.target_modules) == built, targets
    quantized = sum(m.codes.numel() * 2 for m in model.modules() if hasattr(m, "codes"))  # two codes a byte
    assert shape.quantized_params - sum(i * o for i, o in shape.linears.values()) == quantized
