"""The same numbers on every CPU, whichever bf16 features it has.

On CPUs with AVX512-BF16, bitsandbytes' `Linear4bit` repacks its weight in place at the first eval forward without
grad and computes in bf16 from then on (nf4.keep_layout). `Linear4bit` reads the feature when it is built,
so the `cpu_kind` fixture simulates each kind of CPU, whatever this machine is, by answering that question before
any model is built. Both kinds must give the numbers of the grad-enabled (training) path.
"""

import json

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file

from qlora_kit import adapter as adapter_io
from qlora_kit.config import load_recipe
from qlora_kit.errors import UserError
from qlora_kit.inference import load_adapter_model
from qlora_kit.merge import merge
from qlora_kit.nf4 import use_cpu_bf16_kernel
from qlora_kit.train import build_model, train

from conftest import write_jsonl

CPU = torch.device("cpu")
IDS = torch.randint(0, 250, (2, 20), generator=torch.Generator().manual_seed(5))
THIS_CPU_HAS_AVX512_BF16 = bool(bnb.functional.has_avx512bf16())
# Some linears without LoRA: those run bitsandbytes' own `Linear4bit.forward`, where the repacking happens (LoRA
# layers compute their base through fused.py).
TARGETS = "lora.target_modules=[q_proj, v_proj]"


@pytest.fixture(params=["avx512_bf16", "no_avx512_bf16"])
def cpu_kind(request, monkeypatch) -> str:
    has = request.param == "avx512_bf16"
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: has)  # read by Linear4bit.__init__
    return request.param


def packed_layers(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, bnb.nn.Linear4bit) and getattr(m.weight.quant_state, "packing_format_for_cpu", False)]


def trained_looking_adapter(model_dir, out) -> tuple[torch.nn.Module, object]:
    """A model built as training builds it, with a non-zero adapter saved to `out`, and the saved adapter dir."""
    recipe = load_recipe(None, [f"model.path={model_dir}", "lora.r=4", "lora.alpha=8", "lora.dropout=0", TARGETS])
    loaded = build_model(recipe, CPU)
    torch.manual_seed(1)
    for name, param in loaded.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    config = adapter_io.adapter_config(recipe.lora, adapter_io.peft_target_modules(loaded.targets, loaded.linears),
                                       str(loaded.path))
    adapter_io.save_adapter(loaded.model, out, config)
    return loaded.model, out


def test_eval_forwards_compute_like_training_and_leave_the_weights_alone(cpu_kind, tiny_llama, tmp_path):
    model, adapter_dir = trained_looking_adapter(tiny_llama, tmp_path / "adapter")
    with torch.enable_grad():  # the training path (fused LoRA over the 4-bit base), in eval mode
        training_logits = model.eval()(IDS).logits.detach()
    loaded = load_adapter_model(adapter_dir, CPU).model  # what eval, generate and the merge check use
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    with torch.no_grad():
        first, second = loaded(IDS).logits, loaded(IDS).logits
    assert packed_layers(loaded) == []
    assert torch.equal(first, second)
    torch.testing.assert_close(first, training_logits, rtol=0, atol=1e-5)  # fp32; bf16 differs by ~1e-2 here
    after = loaded.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_merge_check_passes(cpu_kind, tiny_llama, tmp_path):
    _, adapter_dir = trained_looking_adapter(tiny_llama, tmp_path / "adapter")
    report = merge(adapter_dir, tmp_path / "merged", dtype="float32")
    assert report.passed and report.logits_max_abs_diff <= 1e-4 * report.logits_max_abs


@pytest.mark.slow
def test_evaluation_during_training_changes_nothing_it_trains(cpu_kind, tiny_llama, memorise_data, tmp_path):
    held_out = write_jsonl(tmp_path / "e.jsonl", [{"prompt": f"Reverse: {w}\n", "completion": w[::-1]}
                                                  for w in ("echo", "golf", "hotel")])
    common = [f"model.path={tiny_llama}", f"data.path={memorise_data}", "train.max_steps=6", "train.lr=1e-2",
              "train.seq_len=64", "train.micro_batch_size=2", "lora.r=4", "lora.dropout=0", TARGETS]
    plain = train(load_recipe(None, [*common, f"output_dir={tmp_path / 'plain'}"]))
    evaluated = train(load_recipe(None, [*common, f"output_dir={tmp_path / 'eval'}", f"data.eval_path={held_out}",
                                         "train.eval_every=2"]))
    assert evaluated.eval_loss is not None
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("plain", "eval")]
    assert losses[0] == losses[1]
    ours, theirs = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in (plain, evaluated))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert packed_layers(evaluated.model) == []


def test_the_bf16_kernel_is_refused_on_a_cpu_without_it(tiny_llama, monkeypatch):
    monkeypatch.setattr(bnb.functional, "has_avx512bf16", lambda: False)
    recipe = load_recipe(None, [f"model.path={tiny_llama}"])
    model = build_model(recipe, CPU).model
    with pytest.raises(UserError, match="AVX512-BF16"):
        use_cpu_bf16_kernel(model)
    assert all(not m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


@pytest.mark.skipif(not THIS_CPU_HAS_AVX512_BF16, reason="bitsandbytes' bf16 CPU kernel needs AVX512-BF16 to run")
def test_the_opt_in_bf16_kernel_computes_in_bf16(tiny_llama, tmp_path):
    _, adapter_dir = trained_looking_adapter(tiny_llama, tmp_path / "adapter")
    loaded = load_adapter_model(adapter_dir, CPU).model
    with torch.no_grad():
        exact = loaded(IDS).logits
        use_cpu_bf16_kernel(loaded)
        fast = loaded(IDS).logits
    assert packed_layers(loaded) != []  # the opt-in really switched kernels
    assert not torch.equal(fast, exact)
    torch.testing.assert_close(fast, exact, rtol=0, atol=0.05 * exact.abs().max().item())
