"""`train.offload_base` on the CPU: the install/release hooks run (storage and compute device coincide)."""

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file

from qlora_kit.config import load_recipe
from qlora_kit.errors import UserError
from qlora_kit.train import build_model, train


def recipe_for(model_dir, data, out, *overrides):
    return load_recipe(None, [f"model.path={model_dir}", f"data.path={data}", f"output_dir={out}",
                              "train.seq_len=64", "train.micro_batch_size=2", "lora.r=8", "train.lr=1e-2",
                              "train.max_steps=4", "lora.dropout=0.1", *overrides])


def test_training_with_offload_gives_the_same_adapter_bit_for_bit(tiny_llama, memorise_data, tmp_path):
    runs = [train(recipe_for(tiny_llama, memorise_data, tmp_path / f"offload-{on}", f"train.offload_base={on}"))
            for on in ("false", "true")]
    a, b = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in runs)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in b.items() if "lora_B" in k)  # it trained
    # Every block let go of its weights, including the MLPs whose recompute stopped early (at the last save)
    linears = [m for n, m in runs[1].model.named_modules() if isinstance(m, bnb.nn.Linear4bit) and ".layers." in n]
    assert linears and all(m.weight.numel() == 0 for m in linears)


def test_layers_hold_their_weights_only_while_they_run(tiny_llama, tmp_path):
    plain = build_model(recipe_for(tiny_llama, "x", tmp_path), torch.device("cpu"))[0].model.eval()
    offloaded = build_model(recipe_for(tiny_llama, "x", tmp_path, "train.offload_base=true"),
                            torch.device("cpu"))[0].model.eval()
    linears = [m for n, m in offloaded.named_modules() if isinstance(m, bnb.nn.Linear4bit) and ".layers." in n]
    assert linears and all(m.weight.numel() == 0 for m in linears)  # released: an empty placeholder
    seen = []
    layer = offloaded.model.layers[0]
    layer.self_attn.q_proj.register_forward_hook(lambda m, *_: seen.append(m.base_layer.weight.numel()))
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(offloaded(ids).logits, plain(ids).logits)
    assert seen and seen[0] > 0  # installed while running
    assert all(m.weight.numel() == 0 for m in linears)  # and released after


def test_offload_needs_gradient_checkpointing():
    with pytest.raises(UserError, match="train.offload_base"):
        load_recipe(None, ["train.offload_base=true", "train.gradient_checkpointing=false"])
