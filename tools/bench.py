"""Train the same QLoRA job with qlora-kit and with the standard stack, and compare speed, memory and loss.

The standard stack is what the transformers / peft / bitsandbytes docs recommend for QLoRA: `from_pretrained`
with `BitsAndBytesConfig` (NF4, double quantization), `prepare_model_for_kbit_training`, `get_peft_model`,
`Trainer` with gradient checkpointing, `paged_adamw_32bit`, `DataCollatorForSeq2Seq` (pads each micro-batch
to its longest example) and loss on completions only. Both stacks get the same model, data file, tokenisation,
LoRA rank/alpha/dropout/targets (all linears), micro-batch, max length, epochs, learning rate (constant, no
warmup), gradient clipping (1.0), weight decay (0), and compute dtype (fp32 on CPU, bf16 on GPU). Each runs in
its own process, so peak memory (VmHWM on CPU, `max_memory_allocated` on GPU) is its own.

    python tools/bench.py --out bench.json                     # CPU: SmolLM2-135M-Instruct, 128 examples
    python tools/bench.py --model llama-3.1-8b-shape           # GPU: random-weight Llama-3.1-8B, seq 2048

Measured per stack: load seconds (build the 4-bit model with LoRA), train seconds (the training loop; qlora-kit's
includes writing its final checkpoint), real (non-padding) tokens/s, peak memory, and the final loss: the mean
token loss over the whole training set, recomputed after training in eval mode (no dropout) by one function
shared by both stacks. Ratios are qlora-kit / standard.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

IGNORE = -100
LLAMA_8B_SHAPE = "llama-3.1-8b-shape"
WORDS = ("the a of to and in is that for it with as was on be by this are from at or an have not which one "
         "model data train token layer weight memory speed batch loss value small large first last time each "
         "river mountain city market garden window letter number answer question reason method result system "
         "quickly slowly always never often careful simple strong bright quiet green heavy early late "
         "write read find keep give take make know think build measure compare explain describe follow").split()


# ------------------------------------------------------------------------------------------------ data


def make_rows(tokenizer, n: int, seed: int, min_tokens: int, max_tokens: int) -> list[dict[str, str]]:
    """Prompt/completion rows whose token lengths (prompt + completion) spread uniformly over [min, max].

    English-like word salad: the words per token of this tokenizer are measured once, so lengths land near
    their targets for any tokenizer (SmolLM2's BPE: ~1.3 tokens a word; the byte-level tiny one: ~6).
    """
    rng = random.Random(seed)
    sample = " ".join(rng.choice(WORDS) for _ in range(400))
    tokens_per_word = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / 400
    rows = []
    for i in range(n):
        total = rng.randint(min_tokens, max_tokens)
        prompt_tokens = int(total * rng.uniform(0.2, 0.8))
        words = [max(1, round(t / tokens_per_word)) for t in (prompt_tokens, total - prompt_tokens)]
        prompt, completion = (" ".join(rng.choice(WORDS) for _ in range(w)) for w in words)
        rows.append({"prompt": f"Request {i}: {prompt}\nAnswer:", "completion": f" {completion}"})
    return rows


def encode(row: dict[str, str], tokenizer, seq_len: int) -> tuple[list[int], list[int]]:
    """The standard stack's tokenisation, written to match qlora-kit's `formats.py` exactly.

    prompt tokens (with the tokenizer's special tokens) + completion tokens + EOS; labels IGNORE on the prompt.
    Too long: cut the prompt from its start (keeping a leading BOS), then the end.
    """
    prompt = tokenizer(row["prompt"])["input_ids"]
    completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids, labels = prompt + completion, [IGNORE] * len(prompt) + completion
    if len(ids) > seq_len:
        keep_head = 1 if ids[0] == tokenizer.bos_token_id and len(prompt) > 1 else 0
        cut = min(len(ids) - seq_len, len(prompt) - keep_head)
        ids, labels = ids[:keep_head] + ids[keep_head + cut:], labels[:keep_head] + labels[keep_head + cut:]
    return ids[:seq_len], labels[:seq_len]


def check_same_as_qlora_kit(rows, tokenizer, seq_len: int) -> None:
    """The tool's tokenisation must give qlora-kit's ids and labels, or the comparison is not of the same job."""
    from qlora_kit.formats import EncodingRules, encode_prompt_completion, fit_to_length

    encoding = EncodingRules("prompt_completion", seq_len)
    for i, row in enumerate(rows):
        ids, labels, _ = fit_to_length(encode_prompt_completion(row["prompt"], row["completion"], tokenizer),
                                       encoding, tokenizer.bos_token_id)
        if (ids, labels) != encode(row, tokenizer, seq_len):
            raise SystemExit(f"bench: row {i} tokenises differently from qlora-kit's formats.py")


def pad(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    batch = {"input_ids": torch.full((len(examples), width), pad_id), "labels": torch.full((len(examples), width),
             IGNORE), "attention_mask": torch.zeros(len(examples), width, dtype=torch.long)}
    for i, (ids, labels) in enumerate(examples):
        batch["input_ids"][i, :len(ids)] = torch.tensor(ids)
        batch["labels"][i, :len(ids)] = torch.tensor(labels)
        batch["attention_mask"][i, :len(ids)] = 1
    return batch


@torch.no_grad()
def train_set_loss(model, examples, pad_id: int, micro_batch: int, device: torch.device) -> float:
    """Mean next-token loss over every label token of the training set, in eval mode; the same for both stacks."""
    model.eval()
    examples = sorted(examples, key=lambda e: len(e[0]))  # less padding; the per-token sum does not change
    total, count = 0.0, 0
    for i in range(0, len(examples), micro_batch):
        batch = {k: v.to(device) for k, v in pad(examples[i:i + micro_batch], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE
        total += F.cross_entropy(logits[:, :-1][mask].float(), targets[mask], reduction="sum").item()
        count += int(mask.sum())
    return total / count


# ---------------------------------------------------------------------------------------- the two stacks


def run_qlora_kit(s: dict) -> dict:
    import qlora_kit.train as qtrain
    from qlora_kit.config import load_recipe
    from qlora_kit.memory import peak_memory_bytes
    from qlora_kit.model import load_tokenizer

    overrides = [f"model.path={s['model_dir']}", f"data.path={s['data']}", "data.format=prompt_completion",
                 f"train.seq_len={s['seq_len']}", f"train.micro_batch_size={s['micro_batch']}",
                 f"train.epochs={s['epochs']}", f"train.max_steps={s['max_steps']}", f"train.lr={s['lr']}",
                 "train.lr_schedule=constant", "train.warmup_steps=0", "train.max_grad_norm=1.0",
                 "train.gradient_checkpointing=true", f"lora.r={s['r']}", f"lora.alpha={s['alpha']}",
                 f"lora.dropout={s['dropout']}", "lora.target_modules=all-linear", "optim.name=paged_adamw_32bit",
                 "optim.weight_decay=0", "quant.quant_type=nf4", "quant.double_quant=true",
                 f"quant.compute_dtype={s['compute_dtype']}", f"output_dir={s['work']}/qlora-kit", f"seed={s['seed']}"]
    recipe = load_recipe(None, overrides)
    tokenizer = load_tokenizer(Path(s["model_dir"]))
    rows = read_rows(s["data"])
    check_same_as_qlora_kit(rows, tokenizer, s["seq_len"])

    load_seconds = []
    build_model = qtrain.build_model

    def timed_build(*a, **kw):  # load time = building the 4-bit model with LoRA, as for the standard stack
        start = time.perf_counter()
        out = build_model(*a, **kw)
        load_seconds.append(time.perf_counter() - start)
        return out

    qtrain.build_model = timed_build
    result = qtrain.train(recipe, overwrite=True)
    device = next(p.device for p in result.model.parameters())
    peak = peak_memory_bytes(device)
    examples = [encode(r, tokenizer, s["seq_len"]) for r in rows]
    loss = train_set_loss(result.model, examples, tokenizer.pad_token_id, s["micro_batch"], device)
    return {"load_seconds": load_seconds[0], "train_seconds": result.seconds, "steps": result.steps,
            "real_tokens": result.tokens, "peak_mem_bytes": peak, "final_loss": loss,
            "last_step_loss": result.final_loss}


def run_standard(s: dict) -> dict:
    import bitsandbytes as bnb
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from qlora_kit.memory import peak_memory_bytes

    cuda = s["device"] == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(s["model_dir"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # labels are built from the rows, so EOS keeps its label
    tokenizer.padding_side = "right"
    rows = read_rows(s["data"])
    examples = [encode(r, tokenizer, s["seq_len"]) for r in rows]
    dataset = Dataset.from_dict({"input_ids": [e[0] for e in examples], "labels": [e[1] for e in examples],
                                 "attention_mask": [[1] * len(e[0]) for e in examples]})

    start = time.perf_counter()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(s["model_dir"], quantization_config=quant, dtype=dtype,
                                                 device_map={"": 0} if cuda else {"": "cpu"})
    for module in model.modules():  # no bf16 repacking at the final-loss pass, as qlora-kit (nf4.keep_layout)
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=s["r"], lora_alpha=s["alpha"], lora_dropout=s["dropout"], target_modules="all-linear",
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    load_seconds = time.perf_counter() - start

    args = TrainingArguments(
        output_dir=f"{s['work']}/standard", per_device_train_batch_size=s["micro_batch"],
        num_train_epochs=s["epochs"], max_steps=s["max_steps"] or -1, learning_rate=s["lr"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="paged_adamw_32bit", gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=not cuda, bf16=cuda, seed=s["seed"],
        dataloader_num_workers=0, remove_unused_columns=False, label_names=["labels"], disable_tqdm=True)
    pad_collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)
    real_tokens = [0]

    def collate(features):  # counts the real tokens the steps ran, as qlora-kit's loop does
        batch = pad_collator(features)
        real_tokens[0] += int(batch["attention_mask"].sum())
        return batch

    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate,
                      processing_class=tokenizer)
    start = time.perf_counter()
    out = trainer.train()
    train_seconds = time.perf_counter() - start
    device = torch.device("cuda") if cuda else torch.device("cpu")
    peak = peak_memory_bytes(device)
    last = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    loss = train_set_loss(model, examples, tokenizer.pad_token_id, s["micro_batch"], device)
    return {"load_seconds": load_seconds, "train_seconds": train_seconds, "steps": out.global_step,
            "real_tokens": real_tokens[0], "peak_mem_bytes": peak, "final_loss": loss,
            "last_step_loss": last[-1] if last else float("nan")}


STACKS = {"qlora-kit": run_qlora_kit, "standard": run_standard}


def read_rows(path: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def run_one(stack: str, settings_path: Path) -> None:
    settings = json.loads(settings_path.read_text())
    result = STACKS[stack](settings)
    result["tokens_per_s"] = result["real_tokens"] / result["train_seconds"]
    Path(settings["result_dir"], f"{stack}.json").write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------ driver


def build_llama_8b_shape(out: Path) -> Path:
    """Random-weight Llama-3.1-8B shape (bf16, ~16 GB written as safetensors shards) + the byte-level tokenizer.

    Unmeasured here (no GPU in the task that wrote this): the GPU path is kept simple and untested at scale.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_kit.model_paths import byte_level_tokenizer

    tokenizer = byte_level_tokenizer()
    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                         rope_theta=500000.0, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: 16 GB, not 32 GB of fp32 first
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # GPU init: seconds, not minutes
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(out, max_shard_size="2GB")
    tokenizer.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def hardware(device: str) -> dict:
    import bitsandbytes
    import peft
    import transformers

    info = {"device": device, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__}
    info["cpu"] = cpu_name()
    info["avx512_bf16"] = bool(bitsandbytes.functional.has_avx512bf16())
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cpu_name() -> str:
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m",
                   help=f"any qlora-kit model.path, or {LLAMA_8B_SHAPE} (GPU: random weights, seq 2048)")
    p.add_argument("--examples", type=int, default=128)
    p.add_argument("--min-tokens", type=int, default=30, help="shortest example (prompt + completion), in tokens")
    p.add_argument("--max-tokens", type=int, default=250, help="longest example, in tokens")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: run the epochs)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stack", choices=("both", *STACKS), default="both")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--work", help="folder for the data, the model and the runs (default: a temporary one)")
    p.add_argument("--run-one", choices=STACKS, help=argparse.SUPPRESS)  # internal: one stack, in a child process
    p.add_argument("--settings", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.model == LLAMA_8B_SHAPE:
        if not torch.cuda.is_available():
            p.error(f"{LLAMA_8B_SHAPE} needs a GPU")
        args.seq_len, args.min_tokens, args.max_tokens = 2048, 256, 2048
    return args


def run_stack(stack: str, settings: dict, work: Path) -> dict:
    """One stack in a fresh process: its peak memory is its own, and nothing one imports touches the other."""
    settings_path = work / "settings.json"
    settings_path.write_text(json.dumps(settings))
    cmd = [sys.executable, __file__, "--run-one", stack, "--settings", str(settings_path)]
    print(f"bench: running {stack} ...", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    return json.loads((work / "results" / f"{stack}.json").read_text())


FIELDS = (("load_seconds", "load s", "{:.1f}"), ("train_seconds", "train s", "{:.1f}"),
          ("tokens_per_s", "real tokens/s", "{:.0f}"), ("peak_mem_bytes", "peak memory MiB", "{:.0f}"),
          ("final_loss", "final loss (train set)", "{:.4f}"), ("steps", "steps", "{}"),
          ("real_tokens", "real tokens", "{}"))
RATIOS = {"load_seconds": "load_seconds", "train_seconds": "train_seconds", "peak_mem": "peak_mem_bytes",
          "final_loss": "final_loss", "tokens_per_s": "tokens_per_s"}


def table(report: dict) -> str:
    names = [s for s in ("qlora_kit", "standard") if s in report]
    lines = [f"{'':24}" + "".join(f"{n:>14}" for n in names) + (f"{'ratio':>10}" if "ratios" in report else "")]
    for key, label, fmt in FIELDS:
        values = [report[n][key] / 2**20 if key == "peak_mem_bytes" else report[n][key] for n in names]
        ratio = next((report["ratios"][r] for r, k in RATIOS.items() if k == key), None) if "ratios" in report else None
        lines.append(f"{label:24}" + "".join(f"{fmt.format(v):>14}" for v in values)
                     + (f"{ratio:>10.3f}" if ratio is not None else ""))
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.run_one:
        run_one(args.run_one, args.settings)
        return
    from qlora_kit.model import load_tokenizer
    from qlora_kit.model_paths import resolve_model_path

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.work or tempfile.mkdtemp(prefix="qlora-kit-bench-"))
    (work / "results").mkdir(parents=True, exist_ok=True)
    model_dir = (build_llama_8b_shape(work / "model") if args.model == LLAMA_8B_SHAPE
                 else resolve_model_path(args.model))
    tokenizer = load_tokenizer(model_dir)
    rows = make_rows(tokenizer, args.examples, args.seed, args.min_tokens, args.max_tokens)
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lengths = sorted(len(encode(r, tokenizer, args.seq_len)[0]) for r in rows)
    settings = {"model": args.model, "model_dir": str(model_dir), "data": str(data), "examples": args.examples,
                "example_tokens": {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1]},
                "micro_batch": args.micro_batch, "epochs": args.epochs, "max_steps": args.max_steps, "lr": args.lr,
                "lr_schedule": "constant", "warmup_steps": 0, "max_grad_norm": 1.0, "weight_decay": 0.0,
                "r": args.r, "alpha": args.alpha, "dropout": args.dropout, "target_modules": "all-linear",
                "seq_len": args.seq_len, "seed": args.seed, "device": device,
                "compute_dtype": "bfloat16" if device == "cuda" else "float32", "optimizer": "paged_adamw_32bit",
                "quant": "nf4 + double quant", "gradient_checkpointing": True,
                "work": str(work), "result_dir": str(work / "results")}
    report = {"hardware": hardware(device), "settings": settings}
    stacks = list(STACKS) if args.stack == "both" else [args.stack]
    for stack in stacks:
        report[stack.replace("-", "_")] = run_stack(stack, settings, work)
    if len(stacks) == 2:
        ours, theirs = report["qlora_kit"], report["standard"]
        report["ratios"] = {r: ours[k] / theirs[k] for r, k in RATIOS.items()}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    if args.work:
        print(f"bench: wrote {args.out}; data, model and runs kept in {work}", file=sys.stderr)
    else:  # a temporary folder: the 8B-shape model alone is ~16 GB
        shutil.rmtree(work, ignore_errors=True)
        print(f"bench: wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
