"""The demo, end to end on the real built-in model, cut to a few steps and a few held-out examples."""

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from qlora_kit.demo import ROOT, run_demo
from qlora_kit.llama_cpp_eval import llama_cpp_available


@pytest.mark.slow
def test_demo_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path / "cache"))  # converts the GGUF afresh (~35 s)
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text("".join((ROOT / "recipes/data/dates-eval.jsonl").read_text().splitlines(True)[:6]))
    report = run_demo(tmp_path / "demo", ["train.max_steps=2", f"data.eval_path={held_out}"])
    assert json.loads((tmp_path / "demo" / "demo_report.json").read_text()) == report
    assert report["before"]["exact_match"] == 0.0  # the base model does not know the house style
    assert 0.0 <= report["after"]["exact_match"] <= 1.0 and report["eval_examples"] == 6
    assert report["train_seconds"] > 0 and report["peak_mem_bytes"] > 100 * 2**20
    merged = AutoModelForCausalLM.from_pretrained(report["paths"]["merged"])
    assert str(merged.dtype) == "torch.float16"
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").is_file()
    gguf = report["gguf"]
    assert gguf["type"] == "q8_0" and Path(report["paths"]["gguf"]).is_file()
    assert gguf["perplexity_gguf"] < 1.1 * gguf["perplexity_reference"]
    if llama_cpp_available():  # the same prompts, tokenized by llama.cpp from the GGUF's own metadata
        assert gguf["llama_cpp"]["examples"] == 6 and gguf["llama_cpp"]["prompt_ids_differ"] == 0
