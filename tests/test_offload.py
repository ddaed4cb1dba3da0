"""`train.offload_base` on the CPU: the install/release hooks run (storage and compute device coincide)."""

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file

from qlora_kit import cpu
from qlora_kit.batching import collate_padding_free
from qlora_kit.config import load_recipe
from qlora_kit.errors import UserError
from qlora_kit.loss import token_loss_sum
from qlora_kit.model_paths import save_tiny_random
from qlora_kit.train import build_model, enable_checkpointing, train

CPU = torch.device("cpu")


def recipe_for(model_dir, data, out, *overrides):
    return load_recipe(None, [f"model.path={model_dir}", f"data.path={data}", f"output_dir={out}",
                              "train.seq_len=64", "train.micro_batch_size=2", "lora.r=8", "train.lr=1e-2",
                              "train.max_steps=4", "lora.dropout=0.1", *overrides])


@pytest.mark.slow
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
    plain = build_model(recipe_for(tiny_llama, "x", tmp_path), torch.device("cpu")).model.eval()
    offloaded = build_model(recipe_for(tiny_llama, "x", tmp_path, "train.offload_base=true"),
                            torch.device("cpu")).model.eval()
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


def test_at_most_two_layers_are_on_the_device_through_a_training_step(tmp_path, memorise_data, monkeypatch):
    """The GPU's code path on the CPU: the 4-bit weights and quant states are what backward keeps (no CPU-only
    dequantized copy), and every device copy is a real clone, so what is alive is what a GPU would hold."""
    monkeypatch.setattr(cpu, "SPEEDUPS", False)
    model_dir = save_tiny_random(tmp_path / "m", num_hidden_layers=6)
    loaded = build_model(recipe_for(model_dir, memorise_data, tmp_path, "train.offload_base=true"), CPU)
    model, offload = loaded.model, loaded.offload
    enable_checkpointing(model)
    model.train()
    counts = []
    for layer in model.model.layers:
        for block in (layer.self_attn, layer.mlp):
            block.register_forward_pre_hook(lambda *_: counts.append(len(offload.resident())))
            block.register_forward_hook(lambda *_: counts.append(len(offload.resident())), always_call=True)
    for name, param in model.named_parameters():
        if "lora_" in name:  # at every LoRA gradient, i.e. all through the backward
            param.register_hook(lambda grad: counts.append(len(offload.resident())))
    rows = [{"input_ids": list(range(5, 5 + n)), "labels": list(range(5, 5 + n)), "length": n} for n in (9, 13)]
    loss, _ = token_loss_sum(model, collate_padding_free(rows))
    loss.backward()
    assert len(counts) > 6 * 4 and max(counts) == 2, counts
    assert offload.resident() == set()  # nothing left on the device after the step
    with torch.no_grad():
        model.eval()(torch.tensor([list(range(5, 15))]))
    assert offload.resident() == set()
