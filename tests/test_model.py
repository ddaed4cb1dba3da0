"""Loading: our streaming 4-bit loader against transformers' own bitsandbytes loading."""

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch

from qlora_kit.config import QuantConfig
from qlora_kit.errors import UserError
from qlora_kit.model import compute_dtype_for, load_quantized

from conftest import make_tiny_model, transformers_4bit

CPU = torch.device("cpu")


def linear4bit_modules(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_4bit_weights_are_bit_identical_to_transformers(tiny_models, arch, quant_type, double_quant):
    quant = QuantConfig(quant_type=quant_type, double_quant=double_quant)
    ours = load_quantized(tiny_models[arch], quant, CPU).model
    theirs = transformers_4bit(tiny_models[arch], quant.quant_type, quant.double_quant)
    ours_q, theirs_q = linear4bit_modules(ours), linear4bit_modules(theirs)
    assert ours_q.keys() == theirs_q.keys() and len(ours_q) == 2 * (7 if arch != "phi3" else 4)
    for name, layer in ours_q.items():
        assert torch.equal(layer.weight.data, theirs_q[name].weight.data), name
        w_ours = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        w_theirs = bnbf.dequantize_4bit(theirs_q[name].weight.data, theirs_q[name].weight.quant_state)
        assert torch.equal(w_ours, w_theirs), name
        assert layer.weight.quant_state.quant_type == quant_type
        assert layer.weight.quant_state.nested == double_quant and layer.weight.quant_state.blocksize == 64
    ids = torch.randint(0, 200, (2, 12))
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=1e-5)


def test_head_stays_unquantized_and_everything_is_frozen(tiny_llama):
    model = load_quantized(tiny_llama, QuantConfig(), CPU).model
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters())
    assert model.model.embed_tokens.weight.dtype == torch.float32  # compute dtype on CPU; no blanket upcast


def test_tied_embeddings_stay_tied(tmp_path):
    path = make_tiny_model(tmp_path / "tied", "llama", tie=True)
    model = load_quantized(path, QuantConfig(), CPU).model
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_bf16_checkpoint_loads_in_compute_dtype(tmp_path):
    path = make_tiny_model(tmp_path / "bf16", "qwen2", dtype=torch.bfloat16)
    model = load_quantized(path, QuantConfig(), CPU).model
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.bias.dtype == torch.float32


def test_compute_dtype_auto_is_fp32_on_cpu():
    assert compute_dtype_for("auto", CPU) == torch.float32
    assert compute_dtype_for("bfloat16", CPU) == torch.bfloat16


def test_missing_weights_are_an_error(tmp_path, tiny_llama):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_llama.iterdir():
        if f.name != "model.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(tiny_llama / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(UserError, match="missing 1 tensors: model.layers.1.mlp.up_proj.weight"):
        load_quantized(broken, QuantConfig(), CPU)
