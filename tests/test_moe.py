"""Mixture-of-experts models in 4-bit (experts.py) on tiny random Qwen3-MoE and Mixtral models, in both checkpoint
layouts, against independent references: bitsandbytes, a naive per-expert torch forward, transformers, peft."""

import json

import bitsandbytes.functional as bnbf
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from qlora_kit import adapter as adapter_io
from qlora_kit.batching import collate, collate_padding_free
from qlora_kit.config import QuantConfig, load_recipe
from qlora_kit.errors import UserError
from qlora_kit.experts import Experts4bit
from qlora_kit.loss import token_loss_sum
from qlora_kit.merge import merge
from qlora_kit.model import load_quantized
from qlora_kit.train import build_model, train

from conftest import MOE_CONFIGS, transformers_4bit

CPU = torch.device("cpu")
ARCHS = sorted(MOE_CONFIGS)
LAYOUTS = ["per_expert", "fused"]
IDS = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(3))


def reference_model(path):
    """transformers' own fp32 model of the checkpoint: its fused expert weights, converted by transformers."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def roundtrip(w):
    """bitsandbytes' NF4 (double quant, block 64) quantize -> dequantize of one expert matrix."""
    return bnbf.dequantize_4bit(*bnbf.quantize_4bit(w.contiguous(), blocksize=64, compress_statistics=True,
                                                    quant_type="nf4"))


def moe_recipe(path, *overrides):
    return load_recipe(None, [f"model.path={path}", "lora.r=4", "lora.alpha=8", "lora.dropout=0", *overrides])


def randomize_lora_b(model, seed=1):
    """A trained-looking adapter (B is zero at init: the identity would hide a wrong layout)."""
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_expert_bytes_equal_quantizing_each_expert_with_bitsandbytes(tiny_moe, arch, layout):
    path = tiny_moe[arch, layout]
    ours = load_quantized(path, QuantConfig(), CPU).model
    reference = reference_model(path)
    blocks = [n for n, m in ours.named_modules() if isinstance(m, Experts4bit)]
    assert blocks == [n for n, _ in reference.named_modules() if n.endswith("mlp.experts")]
    assert not any(p.dim() == 3 for p in ours.parameters())  # no 16-bit expert left
    for block in blocks:
        for proj in ("gate_up_proj", "down_proj"):
            stack = ours.get_submodule(f"{block}.{proj}")
            weights = getattr(reference.get_submodule(block), proj)
            assert stack.num_experts == weights.shape[0] == MOE_CONFIGS[arch][1].get("num_experts", 4)
            for e in range(weights.shape[0]):
                packed, state = bnbf.quantize_4bit(weights[e].contiguous(), blocksize=64, compress_statistics=True,
                                                   quant_type="nf4")
                assert torch.equal(stack.codes[e], packed), (block, proj, e)
                assert torch.equal(stack.absmax[e], state.absmax)
                assert torch.equal(stack.absmax2[e], state.state2.absmax)
                assert torch.equal(stack.offset[e], state.offset)
                assert torch.equal(stack.dequantize(e, torch.float32), bnbf.dequantize_4bit(packed, state))


def naive_experts(x, top_k_index, top_k_weights, gate_up, down, loras, scale):
    """transformers' eager experts loop written out in plain torch, one expert and token at a time, LoRA as
    W + scale * B @ A with PEFT's layout decoded by PEFT's own formula (`ParamWrapper.get_delta_weight`)."""
    out = torch.zeros_like(x)
    experts = gate_up.shape[0]
    delta = {}
    for proj, (a, b) in loras.items():
        a3 = a.reshape(experts, -1, a.shape[-1])  # (experts, r, in)
        b3 = b.reshape(b.shape[0], -1, experts)  # (out, r, experts)
        delta[proj] = torch.einsum("o r e, e r i -> e o i", b3, a3) * scale
    for t in range(x.shape[0]):
        for k in range(top_k_index.shape[1]):
            e = int(top_k_index[t, k])
            g, u = (x[t] @ (gate_up[e] + delta["gate_up_proj"][e]).T).chunk(2)
            y = (torch.nn.functional.silu(g) * u) @ (down[e] + delta["down_proj"][e]).T
            out[t] = out[t] + top_k_weights[t, k] * y
    return out


# fp32 differs from the naive loop by summation order only; fp16 compute (GPUs without bf16: LoRA then stays in
# fp32, outside the fused function) by fp16's rounding of each matmul
CASES = [(arch, "float32", 1e-5) for arch in ARCHS] + [("qwen3_moe", "float16", 2e-3)]


@pytest.mark.parametrize("arch, compute, tol", CASES)
def test_experts_forward_and_gradients_equal_a_naive_per_expert_reference(tiny_moe, arch, compute, tol):
    dtype = getattr(torch, compute)
    recipe = moe_recipe(tiny_moe[arch, "per_expert"], f"quant.compute_dtype={compute}")
    model = build_model(recipe, CPU).model.train()
    randomize_lora_b(model)
    block = model.model.layers[0].mlp.experts
    reference = reference_model(tiny_moe[arch, "per_expert"]).model.layers[0].mlp.experts
    experts = block.num_experts
    # the weights ours compute with: each expert cast to the compute dtype, then through NF4
    gate_up = torch.stack([roundtrip(w.to(dtype)).float() for w in reference.gate_up_proj.detach()])
    down = torch.stack([roundtrip(w.to(dtype)).float() for w in reference.down_proj.detach()])

    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 64, generator=g).to(dtype).float()
    # every token to 2 distinct experts, never to expert 0: a block with idle experts, as in real batches
    top_k_index = torch.stack([torch.randperm(experts - 1, generator=g)[:2] + 1 for _ in range(10)])
    top_k_weights = torch.rand(10, 2, generator=g)

    x_ours = x.to(dtype, copy=True).requires_grad_()
    out = block(x_ours, top_k_index, top_k_weights)
    upstream = torch.randn(out.shape, generator=g)
    out.backward(upstream.to(out.dtype))

    leaves = {p: (getattr(block, p).lora_A.weight.detach().float().requires_grad_(),
                  getattr(block, p).lora_B.weight.detach().float().requires_grad_()) for p in ("gate_up_proj",
                                                                                                "down_proj")}
    x_ref = x.clone().requires_grad_()
    expected = naive_experts(x_ref, top_k_index, top_k_weights, gate_up, down, leaves, recipe.lora.alpha / 4)
    expected.backward(upstream)

    def close(ours, theirs):  # relative to the tensor's largest entry
        torch.testing.assert_close(ours.float(), theirs, rtol=0, atol=tol * theirs.abs().max().item())

    close(out, expected)
    close(x_ours.grad, x_ref.grad)
    for proj, (a, b) in leaves.items():
        stack = getattr(block, proj)
        close(stack.lora_A.weight.grad, a.grad)
        close(stack.lora_B.weight.grad, b.grad)
        assert stack.lora_A.weight.grad[:4].abs().max() == 0  # expert 0 got no token: no gradient, no work
        assert stack.lora_A.weight.grad[4:].abs().max() > 0


def test_only_experts_with_tokens_are_dequantized_once_a_pass(tiny_moe):
    """What bitsandbytes actually runs: each expert that received tokens is dequantized once per projection in
    the forward and once in the backward (as dense layers are, fused.py); an idle expert never."""
    from torch.profiler import ProfilerActivity, profile

    block = build_model(moe_recipe(tiny_moe["qwen3_moe", "fused"]), CPU).model.train().model.layers[0].mlp.experts
    x = torch.randn(6, 64, requires_grad=True)
    top_k_index = torch.tensor([[1, 2], [2, 3], [1, 3], [5, 1], [2, 5], [3, 1]])  # experts 1, 2, 3, 5 of 8
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        block(x, top_k_index, torch.rand(6, 2)).sum().backward()
    dequantized = sum(e.name == "bitsandbytes::dequantize_4bit" for e in prof.events())
    assert dequantized == 4 * 2 * 2  # 4 experts x 2 projections x (forward, backward)


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpointed_gradients_equal_plain_ones(tiny_moe, arch):
    """Gradient checkpointing (the training default) recomputes the experts loop: same gradients."""
    from qlora_kit.train import enable_checkpointing

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA A in both
        loaded = build_model(moe_recipe(tiny_moe[arch, "fused"]), CPU)
        randomize_lora_b(loaded.model)
        if checkpointing:
            enable_checkpointing(loaded.model)
        model = loaded.model.train()
        model(IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert any("experts" in n for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_lowers_the_loss(tiny_moe, memorise_data, tmp_path, arch):
    recipe = load_recipe(None, [f"model.path={tiny_moe[arch, 'per_expert']}", f"data.path={memorise_data}",
                                f"output_dir={tmp_path / 'run'}", "train.max_steps=12", "train.lr=1e-2",
                                "train.seq_len=64", "lora.r=8", "lora.alpha=16"])
    result = train(recipe)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < 0.7 * losses[0], losses
    experts_a = [p for n, p in result.model.named_parameters() if "experts" in n and "lora_A" in n]
    assert experts_a and all(p.requires_grad for p in experts_a)


def peft_reference(path, adapter_dir):
    """PEFT on transformers' own 4-bit model, whose fused experts stay in 16 bits (transformers quantizes only
    linears): each expert weight is replaced by its NF4 round trip, the weight our 4-bit experts compute with."""
    base = transformers_4bit(path)
    with torch.no_grad():
        for name, module in base.named_modules():
            if name.endswith("mlp.experts"):
                for proj in ("gate_up_proj", "down_proj"):
                    weights = getattr(module, proj)
                    weights.copy_(torch.stack([roundtrip(w) for w in weights]))
    return PeftModel.from_pretrained(base, adapter_dir).eval()


@pytest.mark.parametrize("arch, layout, targets", [
    ("qwen3_moe", "per_expert", "all-linear"), ("qwen3_moe", "fused", "[experts]"),
    ("mixtral", "per_expert", "[q_proj, v_proj, mlp.experts]"), ("mixtral", "fused", "[experts.down_proj, o_proj]"),
    ("qwen3_moe", "fused", "[q_proj, o_proj]"), ("qwen2_moe", "per_expert", "all-linear"),
    ("qwen2_moe", "fused", "[down_proj, shared_expert.up_proj]"),
    ("mixtral", "per_expert", "[model.layers.1.mlp.experts.gate_up_proj]")])  # one layer's: PEFT gets full names
def test_peft_loads_our_adapter_with_matching_logits(tiny_moe, tmp_path, arch, layout, targets):
    path = tiny_moe[arch, layout]
    recipe = moe_recipe(path, f"lora.target_modules={targets}")
    loaded = build_model(recipe, CPU)
    ours = loaded.model.eval()
    randomize_lora_b(ours)
    modules, parameters = adapter_io.peft_targets(loaded.targets, loaded.linears)
    adapter_io.save_adapter(ours, tmp_path / "adapter", adapter_io.adapter_config(recipe.lora, modules, str(path),
                                                                                  parameters))

    peft_model = get_peft_model(transformers_4bit(path), LoraConfig.from_pretrained(tmp_path / "adapter"))
    result = set_peft_model_state_dict(peft_model, load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora_" in k] == []
    assert sum(1 for n, _ in peft_model.named_parameters() if "lora_" in n) == 2 * len(loaded.targets)

    reference = peft_reference(path, tmp_path / "adapter")
    with torch.no_grad():
        theirs, mine = reference(IDS).logits, ours(IDS).logits
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-4)
        assert not torch.allclose(mine, transformers_4bit(path)(IDS).logits, atol=1e-2)  # the adapter matters

    # and back: our reader installs the file into a fresh model, which then computes the same logits
    fresh = build_model(moe_recipe(path, f"lora.target_modules={targets}"), CPU).model.eval()
    adapter_io.load_adapter_weights(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, mine)


@pytest.mark.parametrize("arch, layout", [("qwen3_moe", "per_expert"), ("mixtral", "fused"),
                                          ("mixtral", "per_expert"), ("qwen2_moe", "per_expert")])
def test_float32_export_matches_the_adapter_on_the_4bit_base(tiny_moe, memorise_data, tmp_path, arch, layout):
    path = tiny_moe[arch, layout]
    recipe = load_recipe(None, [f"model.path={path}", f"data.path={memorise_data}", f"output_dir={tmp_path / 'run'}",
                                "train.max_steps=4", "train.lr=2e-2", "train.seq_len=64", "lora.r=8",
                                "lora.alpha=16", "lora.dropout=0"])
    result = train(recipe)
    trained = result.model.eval()
    report = merge(result.adapter_dir, tmp_path / "merged", dtype="float32")
    assert report.passed and report.logits_max_abs_diff <= 1e-4
    assert any("experts.gate_up_proj" in k for k in report.layers) and max(report.layers.values()) <= 1e-5
    with safe_open(path / "model.safetensors", "pt") as f, \
            safe_open(tmp_path / "merged" / "model.safetensors", "pt") as g:
        assert sorted(g.keys()) == sorted(f.keys())  # written in the checkpoint's own layout
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(IDS).logits, trained(IDS).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_free_batches_equal_padded_ones(tiny_moe, arch):
    """Routing is per token: examples concatenated in one row (padding-free) route, and learn, as when padded."""
    from test_data import random_examples

    model = build_model(moe_recipe(tiny_moe[arch, "fused"]), CPU).model.train()
    randomize_lora_b(model)
    examples = random_examples([5, 17, 9, 30], seed=1)
    grads, losses = [], []
    for batch in (collate(examples, pad_id=0), collate_padding_free(examples)):
        loss_sum, n = token_loss_sum(model, batch)
        (loss_sum / n).backward()
        losses.append((loss_sum / n).item())
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad})
        model.zero_grad(set_to_none=True)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_an_unsupported_moe_layout_is_refused_before_reading_weights(tmp_path):
    """gpt-oss keeps its experts transposed, with biases: refused in one line, not trained with 16-bit experts."""
    from transformers import GptOssConfig

    from qlora_kit.model_paths import save_tiny_random

    path = save_tiny_random(tmp_path / "gpt-oss", GptOssConfig, num_local_experts=4, num_experts_per_tok=2,
                            intermediate_size=32, head_dim=16, layer_types=["full_attention"] * 2)
    (path / "model.safetensors").write_bytes(b"not read")  # refused before any weight is read
    with pytest.raises(UserError, match=r"^gpt_oss: its mixture-of-experts layout .* is not supported") as e:
        load_quantized(path, QuantConfig(), CPU)
    assert "\n" not in str(e.value)


def test_the_memory_trace_runs_the_experts_on_the_meta_device(tiny_moe, tmp_path, capsys):
    """`estimate --trace` on an MoE model: the real experts code at the recipe's shape (each expert an even share
    of the routes), every expert's 4-bit bytes counted as the estimate counts them."""
    from qlora_kit.cli import main
    from qlora_kit.estimate import estimate, shape_from_config
    from qlora_kit.trace import trace_step

    # wide enough that the allocator's 512-byte rounding of each small tensor is lost in the total
    config = {"model_type": "qwen3_moe", "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 512,
              "moe_intermediate_size": 128,
              "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
              "num_experts": 16, "num_experts_per_tok": 4, "tie_word_embeddings": False}
    recipe = load_recipe(None, ["train.seq_len=256", "train.micro_batch_size=2", "lora.r=8"])
    shape = shape_from_config(config, "small")
    trace = trace_step(recipe, config)
    parts = estimate(recipe, shape).parts
    four_bit = parts["4-bit weights"] + parts["4-bit expert weights"]
    assert abs(trace.parts["4-bit weights"] - four_bit) <= 0.03 * four_bit
    assert trace.parts["LoRA weights"] == parts["LoRA weights"]
    (tmp_path / "r.yaml").write_text(f"model:\n  path: {tiny_moe['mixtral', 'fused']}\ntrain:\n  seq_len: 64\n")
    assert main(["estimate", str(tmp_path / "r.yaml"), "--trace"]) == 0
    assert "traced peak" in capsys.readouterr().out


def test_offloading_an_moe_base_is_refused_in_one_line(tiny_moe):
    recipe = moe_recipe(tiny_moe["mixtral", "fused"], "train.offload_base=true")
    with pytest.raises(UserError, match="^mixture-of-experts models: train.offload_base and FSDP do not support"):
        build_model(recipe, CPU)
