"""Merge and export: the exported model computes what the adapter on the 4-bit base computes."""

import json
import os
import shutil
import subprocess
import sys

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from qlora_kit import merge as merge_module
from qlora_kit.cli import main
from qlora_kit.config import QuantConfig, load_recipe
from qlora_kit.errors import UserError
from qlora_kit.files import exclusive
from qlora_kit.merge import merge
from qlora_kit.nf4 import quantize_roundtrip
from qlora_kit.train import train

from conftest import make_tiny_model

IDS = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(3))


def trained_adapter(model_dir, data, out, *overrides):
    recipe = load_recipe(None, [f"model.path={model_dir}", f"data.path={data}", f"output_dir={out}",
                                "train.max_steps=4", "train.lr=2e-2", "train.seq_len=64", "lora.r=8",
                                "lora.alpha=16", "lora.dropout=0", *overrides])
    result = train(recipe)
    return result.adapter_dir, result.model.eval()


def resharded(model_dir, out):
    """The same model saved in many ~40 KB shards, with its tokenizer."""
    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(out, max_shard_size="40KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, out)
    assert len(list(out.glob("*.safetensors"))) > 5
    return out


def exported_state(out):
    files = sorted(out.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_float32_export_matches_the_adapter_on_the_4bit_base(tiny_models, memorise_data, tmp_path, arch):
    adapter, trained = trained_adapter(tiny_models[arch], memorise_data, tmp_path / "run")
    report = merge(adapter, tmp_path / "merged", dtype="float32")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert exported.dtype == torch.float32 and not hasattr(exported.config, "quantization_config")
    with torch.no_grad():
        expected, actual = trained(IDS).logits, exported(IDS).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)
    saved = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert saved["passed"] and saved["base"] == "dequantized" and len(saved["layers"]) == len(report.layers) > 0
    assert saved["logits_max_abs_diff"] <= 1e-4 and saved["peak_mem_bytes"] > 0
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_merged_weight_is_dequantized_base_plus_delta_bit_for_bit(tiny_llama, memorise_data, tmp_path):
    adapter, trained = trained_adapter(tiny_llama, memorise_data, tmp_path / "run")
    merge(adapter, tmp_path / "merged", dtype="float32")
    merged = exported_state(tmp_path / "merged")
    base = load_file(tiny_llama / "model.safetensors")
    for name, layer in trained.named_modules():
        if not isinstance(layer, bnb.nn.Linear4bit):
            continue
        module = name.removesuffix(".base_layer")
        ours = quantize_roundtrip(base[f"{module}.weight"], QuantConfig(), torch.device("cpu"))
        # Bit-identical to what bitsandbytes dequantizes from the 4-bit layer that training used.
        assert torch.equal(ours, bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)), module
        lora = trained.get_submodule(module)
        delta = lora.scale * (lora.lora_B.weight.float() @ lora.lora_A.weight.float())
        assert torch.equal(merged[f"{module}.weight"], ours.float() + delta), module
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"])  # not a linear: copied


def test_base_original_is_w16_plus_delta_and_reports_the_cost(tiny_llama, memorise_data, tmp_path):
    adapter, trained = trained_adapter(tiny_llama, memorise_data, tmp_path / "run")
    report = merge(adapter, tmp_path / "merged", dtype="float32", base="original")
    merged, base = exported_state(tmp_path / "merged"), load_file(tiny_llama / "model.safetensors")
    lora = trained.model.layers[0].self_attn.q_proj
    delta = lora.scale * (lora.lora_B.weight.float() @ lora.lora_A.weight.float())
    assert torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                       base["model.layers.0.self_attn.q_proj.weight"] + delta)
    assert report.passed and min(report.quantization_error.values()) > 1e-3  # 4-bit error the adapter never saw


@pytest.mark.parametrize("dtype, rel", [("float16", 2e-2), ("bfloat16", 8e-2)])
def test_half_precision_exports_load_and_stay_close(tiny_llama, memorise_data, tmp_path, dtype, rel):
    adapter, trained = trained_adapter(tiny_llama, memorise_data, tmp_path / "run")
    report = merge(adapter, tmp_path / "merged", dtype=dtype)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == dtype
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert exported.dtype == getattr(torch, dtype)
    with torch.no_grad():
        expected = trained(IDS).logits
        actual = exported.float().eval()(IDS).logits
    assert (actual - expected).abs().max() <= rel * expected.abs().max()
    assert report.passed and 0 < max(report.layers.values()) < 2e-2


def test_multi_shard_input_and_tied_embeddings(tmp_path, memorise_data):
    sharded = resharded(make_tiny_model(tmp_path / "tied", "llama", tie=True), tmp_path / "sharded")
    adapter, trained = trained_adapter(sharded, memorise_data, tmp_path / "run")
    merge(adapter, tmp_path / "merged", dtype="float32")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert exported.lm_head.weight is exported.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(exported(IDS).logits, trained(IDS).logits, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_float16_overflow_is_refused_with_a_hint(tmp_path, memorise_data):
    model_dir = make_tiny_model(tmp_path / "big", "llama")
    weights = load_file(model_dir / "model.safetensors")
    weights["model.norm.weight"][0] = 1e5
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    adapter, _ = trained_adapter(model_dir, memorise_data, tmp_path / "run")
    with pytest.raises(UserError, match="'model.norm.weight' has values beyond float16's range.*--dtype bfloat16"):
        merge(adapter, tmp_path / "merged", dtype="float16")
    assert not (tmp_path / "merged").exists() and list(tmp_path.glob(".merged*")) == []
    merge(adapter, tmp_path / "merged", dtype="bfloat16")


def test_interrupted_merge_leaves_nothing_that_looks_complete(tmp_path, memorise_data, tiny_llama):
    sharded = resharded(tiny_llama, tmp_path / "sharded")
    adapter, _ = trained_adapter(sharded, memorise_data, tmp_path / "run")
    # The last tensor of the last shard cannot be exported to float16: the merge fails after it has written
    # several output shards (40 KB each here).
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    last_file = sorted(set(index.values()))[-1]
    weights = load_file(sharded / last_file)
    name = sorted(weights)[-1]
    weights[name].view(-1)[0] = 1e6
    save_file(weights, sharded / last_file, metadata={"format": "pt"})
    with pytest.raises(UserError, match=f"'{name}' has values beyond float16's range"):
        merge(adapter, tmp_path / "merged", dtype="float16", max_shard_bytes=40_000)
    assert not (tmp_path / "merged").exists() and list(tmp_path.glob(".merged*")) == []


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qlora_kit", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_merge_refuses_existing_output_and_fails_on_broken_parity(tiny_llama, memorise_data, tmp_path,
                                                                     monkeypatch, capsys):
    adapter, _ = trained_adapter(tiny_llama, memorise_data, tmp_path / "run", "train.merge_after=true",
                                 "train.merge_dtype=float32")
    assert json.loads((tmp_path / "run" / "merged" / "merge_report.json").read_text())["passed"]
    (tmp_path / "exists").mkdir()
    refused = run_cli("merge", adapter, "--out", tmp_path / "exists")
    assert refused.returncode == 2 and "already exists" in refused.stderr
    # A parity failure (here forced by a zero tolerance): exit 1, the export kept aside for inspection only.
    monkeypatch.setitem(merge_module.LOGIT_TOLERANCE, torch.float32, 0.0)
    assert main(["merge", str(adapter), "--out", str(tmp_path / "bad"), "--dtype", "float32"]) == 1
    assert "parity check failed" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert not json.loads((tmp_path / "bad.rejected" / "merge_report.json").read_text())["passed"]


@pytest.fixture(scope="module")
def run_with_adapter(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Reverse: {w}\n", "completion": w[::-1]}) + "\n"
                            for w in ("alpha", "bravo")))
    base = root / "base"
    shutil.copytree(tiny_models["llama"], base)
    recipe = load_recipe(None, [f"model.path={base}", f"data.path={data}", f"output_dir={root / 'run'}",
                                "train.max_steps=2", "train.save_every=1", "lora.r=8", "lora.dropout=0"])
    return base, train(recipe).adapter_dir


def tree(path):
    return {p.relative_to(path): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("out", ["base", "base/sub", "run", "run/adapter", "run/adapter/x", "run/checkpoints", "."])
def test_merge_refuses_an_output_that_would_replace_or_sit_in_its_inputs(run_with_adapter, out, capsys):
    base, adapter = run_with_adapter
    root = base.parent
    before = tree(root)
    code = main(["merge", str(adapter), "--out", str(root / out), "--overwrite", "--no-check"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("qlora-kit: error: --out:"), lines
    assert tree(root) == before  # nothing replaced, nothing written


def test_merge_into_the_run_beside_its_adapter_is_allowed(run_with_adapter):
    base, adapter = run_with_adapter
    merge(adapter, adapter.parent / "merged-here", dtype="float32", overwrite=True)
    assert (adapter.parent / "merged-here" / "model.safetensors").is_file()


def broken_adapter(adapter, tmp_path, config_change=None, weights_change=None):
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    if config_change:
        config = json.loads((broken / "adapter_config.json").read_text())
        config_change(config)
        (broken / "adapter_config.json").write_text(json.dumps(config))
    if weights_change:
        weights = load_file(broken / "adapter_model.safetensors")
        weights_change(weights)
        save_file(weights, broken / "adapter_model.safetensors")
    return broken


def _nan(weights):
    key = next(k for k in weights if "lora_B" in k)
    weights[key][0, 0] = float("nan")


def _drop_a_lora_b(weights):
    del weights[next(k for k in weights if "lora_B" in k)]


def _wrong_a_shape(weights):
    key = next(k for k in weights if "lora_A" in k)
    weights[key] = weights[key][:, :-1].contiguous()


def _unknown_layer(weights):
    key = next(k for k in weights if "lora_A" in k)
    module = key.split(".lora_A")[0]
    renamed = module.rsplit(".", 1)[0] + ".nope_proj"
    for part in ("lora_A", "lora_B"):
        weights[key.replace(module, renamed).replace("lora_A", part)] = weights[key.replace("lora_A", part)].clone()


@pytest.mark.parametrize("config_change, weights_change, message", [
    (lambda c: c.update(r=4), None, "rank r=4"),
    (lambda c: c.pop("r"), None, "'r' must be a positive integer"),
    (None, _nan, "non-finite values"),
    (None, _drop_a_lora_b, "has lora_A but no lora_B"),
    (None, _wrong_a_shape, "adapter's B @ A is"),
    (None, _unknown_layer, "nope_proj, which is not a quantized linear layer"),
])
@pytest.mark.parametrize("check", [True, False])
def test_broken_adapters_are_refused_before_any_merge(run_with_adapter, tmp_path, capsys, config_change,
                                                      weights_change, message, check):
    _, adapter = run_with_adapter
    broken = broken_adapter(adapter, tmp_path, config_change, weights_change)
    args = ["merge", str(broken), "--out", str(tmp_path / "out")] + ([] if check else ["--no-check"])
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_second_merge_into_the_same_output_is_refused_while_the_first_runs(run_with_adapter, tmp_path, capsys):
    _, adapter = run_with_adapter
    with exclusive(tmp_path / "out", "--out"):  # as another process merging there would hold it
        assert main(["merge", str(adapter), "--out", str(tmp_path / "out")]) == 2
    assert f"in use by another qlora-kit process (pid {os.getpid()})" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_leftovers_of_a_killed_merge_are_removed_by_the_next(run_with_adapter, tmp_path):
    _, adapter = run_with_adapter
    (tmp_path / ".out.tmp-killed").mkdir()
    (tmp_path / ".out.tmp-killed" / "model-00001.safetensors").write_bytes(b"half")
    merge(adapter, tmp_path / "out", dtype="float32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_bf16_trained_adapter_is_checked_in_float32_and_its_float32_export_passes(tiny_llama, memorise_data,
                                                                                    tmp_path):
    """What a GPU run leaves (compute dtype bf16): the check's reference runs in fp32 from the same 4-bit
    weights, so even a float32 export meets the float32 tolerance."""
    adapter, _ = trained_adapter(tiny_llama, memorise_data, tmp_path / "run", "quant.compute_dtype=bfloat16")
    assert json.loads((adapter / "qlora_kit.json").read_text())["compute_dtype"] == "bfloat16"
    report = merge(adapter, tmp_path / "merged", dtype="float32")
    assert report.passed and report.logits_max_abs_diff <= 1e-4 * report.logits_max_abs
