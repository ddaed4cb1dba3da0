"""Smoke test of tools/bench.py: both stacks, two steps each, on a tiny random model (the benchmark itself is not run
by the test suite)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_kit.model_paths import save_tiny_random

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench.py"
STACK_FIELDS = ("load_seconds", "train_seconds", "tokens_per_s", "peak_mem_bytes", "final_loss", "real_tokens")
RATIO_FIELDS = {"load_seconds": "load_seconds", "train_seconds": "train_seconds", "peak_mem": "peak_mem_bytes",
                "final_loss": "final_loss", "tokens_per_s": "tokens_per_s"}


@pytest.mark.slow
def test_bench_runs_both_stacks(tmp_path):
    model = save_tiny_random(tmp_path / "m")
    out = tmp_path / "bench.json"
    env = {**os.environ, "QLORA_KIT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(BENCH), "--model", str(model), "--max-steps", "2", "--examples", "16",
                    "--seq-len", "64", "--out", str(out), "--work", str(tmp_path / "work")],
                   check=True, env=env, timeout=300)
    report = json.loads(out.read_text())
    assert {"hardware", "settings", "qlora_kit", "standard", "ratios"} <= report.keys()
    assert report["hardware"]["torch"] and report["hardware"]["cpu_count"] > 0
    for stack in ("qlora_kit", "standard"):
        result = report[stack]
        assert result["steps"] == 2
        for key in STACK_FIELDS:
            assert result[key] > 0, (stack, key)
        assert result["tokens_per_s"] == pytest.approx(result["real_tokens"] / result["train_seconds"])
    for ratio, key in RATIO_FIELDS.items():
        assert report["ratios"][ratio] == pytest.approx(report["qlora_kit"][key] / report["standard"][key])
    # Same data, same tokenisation, two steps at lr 2e-4 from the same base: the losses barely differ.
    assert report["ratios"]["final_loss"] == pytest.approx(1.0, abs=0.05)


@pytest.mark.slow
def test_generation_bench_runs(tmp_path):
    model = save_tiny_random(tmp_path / "m")
    out = tmp_path / "gen.json"
    env = {**os.environ, "QLORA_KIT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(BENCH.with_name("bench_generate.py")), "--model", str(model),
                    "--max-new-tokens", "4", "--rounds", "1", "--out", str(out)], check=True, env=env, timeout=300)
    report = json.loads(out.read_text())
    assert report["default_tokens_per_s"] > 0 and "cpu" in report["hardware"]
    # The bf16 kernel is measured only where the CPU has it.
    assert ("bf16_kernel_tokens_per_s" in report) == report["hardware"]["avx512_bf16"]


@pytest.mark.slow
def test_gpu_check_runs_its_checks_on_the_cpu(tmp_path):
    """The GPU day's script, on its --quick path here (tiny model, CPU): every check runs and passes."""
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "QLORA_KIT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(BENCH.with_name("gpu_check.py")), "--quick", "--out", str(out)], check=True,
                   env=env, timeout=300)
    report = json.loads(out.read_text())
    assert report["fused_lora"]["passed"] and report["offload"]["passed"]
    assert report["step"]["tokens_per_s"] > 0 and report["memory"]["traced_bytes"] > 0
    assert report["moe"]["tokens_per_s"] > 0 and report["moe"]["traced_bytes"] > 0 and report["moe"]["loss"] > 0
    assert report["versions"]["bitsandbytes"]
