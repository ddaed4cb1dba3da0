"""PEFT, the ecosystem's reference, loads our adapters onto transformers' own 4-bit model and agrees with us."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

from qlora_kit import adapter as adapter_io
from qlora_kit.batching import collate
from qlora_kit.config import load_recipe
from qlora_kit.data import load_examples
from qlora_kit.loss import token_loss_sum
from qlora_kit.train import build_model, train

from conftest import transformers_4bit

CPU = torch.device("cpu")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
@pytest.mark.parametrize("targets, rslora", [("all-linear", False), ("[o_proj, down_proj]", True)])
def test_peft_loads_our_adapter_with_matching_logits(tiny_models, tmp_path, arch, targets, rslora):
    if arch == "phi3" and targets != "all-linear":
        targets = "[qkv_proj, gate_up_proj]"  # Phi-3 fuses q/k/v and gate/up into single linears
    recipe = load_recipe(None, [f"model.path={tiny_models[arch]}", "lora.r=4", "lora.alpha=8", "lora.dropout=0",
                                f"lora.target_modules={targets}", f"lora.use_rslora={rslora}"])
    loaded = build_model(recipe, CPU)
    ours = loaded.model.eval()
    torch.manual_seed(1)
    for name, param in ours.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # a trained-looking adapter, not the identity
    targets = adapter_io.peft_target_modules(loaded.targets, loaded.linears)
    config = adapter_io.adapter_config(recipe.lora, targets, str(loaded.path))
    adapter_io.save_adapter(ours, tmp_path / "adapter", config)

    peft_model = get_peft_model(transformers_4bit(loaded.path), LoraConfig.from_pretrained(tmp_path / "adapter"))
    result = set_peft_model_state_dict(peft_model, load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora_" in k] == []
    n_lora = sum(1 for n, _ in peft_model.named_parameters() if "lora_" in n)
    assert n_lora == 2 * len(loaded.targets)

    reference = PeftModel.from_pretrained(transformers_4bit(loaded.path), tmp_path / "adapter").eval()
    ids = torch.randint(0, 250, (2, 16))
    with torch.no_grad():
        theirs, mine = reference(ids).logits, ours(ids).logits
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-4)
        assert not torch.allclose(mine, transformers_4bit(loaded.path)(ids).logits, atol=1e-2)  # adapter matters


def test_trained_adapter_loss_under_peft_equals_ours(tiny_llama, memorise_data, tmp_path):
    """The issue's acceptance check: PEFT's loss on the training data equals qlora-kit's within 1e-3."""
    recipe = load_recipe(None, [f"model.path={tiny_llama}", f"data.path={memorise_data}",
                                f"output_dir={tmp_path / 'run'}", "train.max_steps=10", "train.lr=1e-2",
                                "train.seq_len=64", "lora.r=8", "lora.alpha=16"])
    result = train(recipe)
    model = result.model.eval()
    tokenizer = build_model(recipe, CPU).tokenizer
    batch = collate(load_examples(memorise_data, tokenizer, 64).dataset, tokenizer.pad_token_id)
    with torch.no_grad():
        loss_sum, n = token_loss_sum(model, batch)
        ours = (loss_sum / n).item()
        peft_model = PeftModel.from_pretrained(transformers_4bit(tiny_llama), result.adapter_dir).eval()
        theirs = peft_model(**batch).loss.item()  # transformers' own shifted, masked cross-entropy
    assert abs(ours - theirs) < 1e-3, (ours, theirs)
    assert ours < 5.0  # trained: below the untrained ~5.6 (uniform over 259 tokens)
