"""The CUDA-only paths (marked `cuda`: they skip on machines without a GPU; conftest.py says how)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from qlora_kit.config import load_recipe
from qlora_kit.merge import merge
from qlora_kit.model import compute_dtype_for
from qlora_kit.train import train

pytestmark = pytest.mark.cuda


def recipe_for(model_dir, data, out, *overrides):
    return load_recipe(None, [f"model.path={model_dir}", f"data.path={data}", f"output_dir={out}", "train.seq_len=64",
                              "train.micro_batch_size=2", "lora.r=8", "train.lr=1e-2", "train.max_steps=4",
                              "lora.dropout=0", *overrides])


def test_offload_on_a_gpu_trains_what_resident_weights_train(tiny_llama, memorise_data, tmp_path):
    """Side-stream copies, waited for and recorded on the compute stream: the same losses and adapter as with the
    weights resident (to rounding: GPU kernels are not bit-reproducible across memory layouts)."""
    runs = [train(recipe_for(tiny_llama, memorise_data, tmp_path / on, f"train.offload_base={on}"))
            for on in ("false", "true")]
    losses = [[json.loads(line)["loss"] for line in (tmp_path / on / "metrics.jsonl").read_text().splitlines()]
              for on in ("false", "true")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    a, b = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in runs)
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), rtol=1e-2, atol=1e-3)


def test_auto_compute_dtype_is_bf16_exactly_where_the_gpu_has_it_natively():
    native = torch.cuda.get_device_capability() >= (8, 0)  # Ampere and later
    assert compute_dtype_for("auto", torch.device("cuda")) == (torch.bfloat16 if native else torch.float16)


def test_the_merge_check_of_a_gpu_trained_adapter_runs_in_float32_and_passes(tiny_llama, memorise_data, tmp_path):
    result = train(recipe_for(tiny_llama, memorise_data, tmp_path / "run"))
    report = merge(result.adapter_dir, tmp_path / "merged", dtype="float32")
    assert report.passed and report.logits_max_abs_diff <= 1e-4 * report.logits_max_abs


def test_an_moe_model_trains_and_merges_on_a_gpu(tiny_moe, memorise_data, tmp_path):
    """Experts in 4-bit on CUDA (bitsandbytes' CUDA kernels, bf16 where native): the loss falls, the merge's float32
    check of the exported experts passes."""
    result = train(recipe_for(tiny_moe["qwen3_moe", "per_expert"], memorise_data, tmp_path / "run",
                              "train.max_steps=8"))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < losses[0]
    report = merge(result.adapter_dir, tmp_path / "merged", dtype="float32")
    assert report.passed and any("experts" in name for name in report.layers)
