"""The checks for the day a GPU is lent: one command, no network, a few minutes on one GPU, JSON results.

    python tools/gpu_check.py --out gpu_check.json          # on a GPU: Llama-3.1-8B's shape cut to 4 layers
    python tools/gpu_check.py --quick --out gpu_check.json  # anywhere: a tiny model, the same checks

Weights are random (initialised from a shipped shape), so nothing is downloaded. Checks, each a JSON entry:
1. versions: torch, CUDA, bitsandbytes and the native library it loaded, the GPU;
2. fused LoRA over 4-bit (the training path, `fused.lora_4bit`) against a plain fp32 reference: output and the
   gradients of x, A and B;
3. one training step at 4 x 2048 tokens (padding-free, checkpointed), attention on the flash kernel where the GPU
   has it: loss, tokens/s, `torch.cuda.max_memory_allocated`;
4. the same step with `train.offload_base`: loss and LoRA gradients against the step without it;
5. the measured peak against the memory trace and the estimate of the same step;
6. mixture of experts: the same step on Qwen3-30B-A3B's shape cut to 2 layers (4-bit experts, LoRA on each):
   loss, tokens/s, measured peak against trace and estimate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlora_kit.batching import collate_padding_free  # noqa: E402
from qlora_kit.config import load_recipe  # noqa: E402
from qlora_kit.estimate import estimate, shape_from_config  # noqa: E402
from qlora_kit.loss import token_loss_sum  # noqa: E402
from qlora_kit.memory import peak_memory_bytes  # noqa: E402
from qlora_kit.trace import trace_step  # noqa: E402


def versions(device: torch.device) -> dict:
    import bitsandbytes as bnb
    import transformers

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "bitsandbytes": bnb.__version__,
            "bitsandbytes_library": str(getattr(bnb.cextension, "BNB_BACKEND", "")) + " " +
            str(getattr(getattr(bnb.cextension, "lib", None), "_name", "")),
            "transformers": transformers.__version__, "device": str(device)}
    if device.type == "cuda":
        info |= {"gpu": torch.cuda.get_device_name(device), "capability": list(torch.cuda.get_device_capability())}
    return info


def fused_lora_against_fp32(device: torch.device, dtype: torch.dtype) -> dict:
    """`fused.lora_4bit` on a 4-bit layer vs x @ dequant(W)^T + s * (x @ A^T) @ B^T in fp32."""
    from qlora_kit import nf4
    from qlora_kit.config import QuantConfig
    from qlora_kit.fused import lora_4bit

    torch.manual_seed(0)
    d_in, d_out, r, tokens = 1024, 2048, 16, 512
    layer = nf4.quantized_linear(torch.nn.Linear(d_in, d_out, device="meta"), torch.randn(d_out, d_in).to(dtype),
                                 QuantConfig(), dtype, device)
    weight, state = nf4.weight_and_state(layer)
    x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
    a = (torch.randn(r, d_in, device=device, dtype=dtype) * 0.05).requires_grad_()
    b = (torch.randn(d_out, r, device=device, dtype=dtype) * 0.05).requires_grad_()
    y = lora_4bit(x, a, b, weight, state, None, 2.0, 0.0)
    y.float().square().sum().backward()
    w = nf4.dequantize(weight, state, torch.float32)
    x32, a32, b32 = (t.detach().float().requires_grad_() for t in (x, a, b))
    y32 = x32 @ w.T + 2.0 * (x32 @ a32.T) @ b32.T
    y32.square().sum().backward()

    def rel(ours, ref):
        return ((ours.float() - ref).abs().max() / ref.abs().max()).item()

    errors = {"output": rel(y.detach(), y32.detach()), "grad_x": rel(x.grad, x32.grad),
              "grad_A": rel(a.grad, a32.grad), "grad_B": rel(b.grad, b32.grad)}
    bound = 2e-2 if dtype != torch.float32 else 1e-4
    return {"relative_errors": errors, "bound": bound, "passed": all(e <= bound for e in errors.values())}


def random_model(out: Path, quick: bool, shape: str = "llama-3.1-8b", layers: int = 4) -> tuple[Path, dict]:
    """A shipped shape (Llama-3.1-8B's by default) cut to `layers` layers (the tiny test model of its family with
    --quick), random weights, saved."""
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen3MoeConfig

    from qlora_kit.estimate import SHAPES
    from qlora_kit.model_paths import byte_level_tokenizer, save_tiny_random

    if quick:
        moe = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16)
        path = (save_tiny_random(out, Qwen3MoeConfig, num_hidden_layers=layers, **moe) if "a3b" in shape
                else save_tiny_random(out, num_hidden_layers=layers))
        return path, json.loads((path / "config.json").read_text())
    config = json.loads((SHAPES / f"{shape}.json").read_text())["config"] | {"num_hidden_layers": layers}
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.bfloat16)
    model.save_pretrained(out)
    byte_level_tokenizer().save_pretrained(out)
    del model
    return out, json.loads((out / "config.json").read_text())


def one_step(model_dir: Path, overrides: list[str], device: torch.device) -> dict:
    """One training step (one micro-batch) of qlora-kit's code: loss, LoRA gradients, time, peak memory."""
    from qlora_kit.train import build_model, enable_checkpointing

    recipe = load_recipe(None, [f"model.path={model_dir}", *overrides])
    torch.manual_seed(0)
    loaded = build_model(recipe, device)
    model = loaded.model
    enable_checkpointing(model)
    model.train()
    t = recipe.train
    ids = torch.randint(3, 250, (t.micro_batch_size, t.seq_len), generator=torch.Generator().manual_seed(1))
    batch = collate_padding_free([{"input_ids": r.tolist(), "labels": r.tolist(), "length": t.seq_len} for r in ids])
    batch = {k: v.to(device) for k, v in batch.items()}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loss, n = token_loss_sum(model, batch)
    (loss / n).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    grads = {k: p.grad.detach().float().cpu() for k, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.item() / n, "tokens_per_s": n / seconds, "seconds": seconds,
            "peak_mem_bytes": peak_memory_bytes(device), "grads": grads, "recipe": recipe}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny model and batch: the checks' own smoke test")
    p.add_argument("--out", default="gpu_check.json")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported(False) else (
        torch.float16 if device.type == "cuda" else torch.float32)
    report = {"versions": versions(device), "fused_lora": fused_lora_against_fp32(device, dtype)}
    size = ["train.micro_batch_size=2", "train.seq_len=64"] if args.quick else ["train.micro_batch_size=4",
                                                                              "train.seq_len=2048"]
    common = [*size, "lora.r=16", "lora.dropout=0", "train.gradient_checkpointing=true"]
    with tempfile.TemporaryDirectory() as work:
        model_dir, config = random_model(Path(work) / "model", args.quick)
        context = (torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION)
                   if device.type == "cuda" else contextlib.nullcontext())
        with context:
            plain = one_step(model_dir, common, device)
            offloaded = one_step(model_dir, [*common, "train.offload_base=true"], device)
        moe_dir, moe_config = random_model(Path(work) / "moe", args.quick, "qwen3-30b-a3b", layers=2)
        with context:
            moe = one_step(moe_dir, common, device)
    worst = max((offloaded["grads"][k] - g).abs().max().item() / max(g.abs().max().item(), 1e-12)
                for k, g in plain["grads"].items())
    report["step"] = {k: plain[k] for k in ("loss", "tokens_per_s", "seconds", "peak_mem_bytes")}
    report["offload"] = {"loss": offloaded["loss"], "loss_difference": abs(offloaded["loss"] - plain["loss"]),
                         "worst_relative_grad_difference": worst,
                         "passed": math.isclose(offloaded["loss"], plain["loss"], rel_tol=1e-3) and worst <= 1e-2}
    recipe = plain["recipe"]
    traced = trace_step(recipe, config).peak
    est = estimate(recipe, shape_from_config(config, "gpu_check"), device.type)
    report["memory"] = {"measured_peak_bytes": plain["peak_mem_bytes"], "traced_bytes": traced,
                        "estimated_bytes": est.total, "measured": "max_memory_allocated" if device.type == "cuda"
                        else "peak RSS of this process (the CPU has no allocator to ask)"}
    report["moe"] = {k: moe[k] for k in ("loss", "tokens_per_s", "seconds", "peak_mem_bytes")} | {
        "traced_bytes": trace_step(moe["recipe"], moe_config).peak,
        "estimated_bytes": estimate(moe["recipe"], shape_from_config(moe_config, "gpu_check moe"), device.type).total}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
