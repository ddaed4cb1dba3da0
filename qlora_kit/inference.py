"""Load a trained model for use, and generate text with it.

Two kinds of directories: an adapter (its base is loaded in 4-bit exactly as training loaded it, plus the
adapter: what the adapter computes) or a plain Hugging Face model (a merged export, or any base).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from qlora_kit import adapter as adapter_io
from qlora_kit.lora import add_lora, lora_dtype_for
from qlora_kit.model import (
    LoadedModel,
    checkpoint_files,
    compute_dtype_for,
    load_config,
    load_quantized,
    load_tokenizer,
    lora_shapes,
)
from qlora_kit.model_paths import resolve_model_path


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / adapter_io.CONFIG_NAME).is_file()


def load_adapter_model(adapter_dir: Path, device: torch.device, compute_dtype: str = "auto",
                       model_path: str | None = None, quantize_from: torch.dtype | None = None) -> LoadedModel:
    """The adapter's base in 4-bit, quantized as in training (settings from `qlora_kit.json`), plus the adapter.
    `quantize_from`: see `load_quantized`."""
    adapter = adapter_io.read_adapter(adapter_dir)
    base = resolve_model_path(adapter.base_path(model_path))
    loaded = load_quantized(base, adapter.quant(compute_dtype), device, quantize_from=quantize_from)
    adapter.check_fits(lora_shapes(loaded.model), str(base))  # before allocating LoRA layers of any size
    add_lora(loaded.model, sorted(adapter.pairs), adapter.r, adapter.config["lora_alpha"], 0.0,
             bool(adapter.config.get("use_rslora")), lora_dtype_for(loaded.compute_dtype))
    adapter_io.install_adapter(loaded.model, adapter)
    loaded.model.eval()
    return loaded


def load_for_inference(path: str, device: torch.device) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """An adapter directory, a model directory, a built-in model name or a GGUF file, ready to generate."""
    if is_adapter_dir(path):
        loaded = load_adapter_model(Path(path), device)
        return loaded.model, loaded.tokenizer
    model_dir = resolve_model_path(path)
    checkpoint_files(model_dir)  # safetensors only: a .bin checkpoint is a pickle, which can run code when loaded
    config = load_config(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=compute_dtype_for("auto", device),
                                                 use_safetensors=True).to(device)
    return model.eval(), load_tokenizer(model_dir)


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """A user message through the chat template for chat models; the raw text for base models."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
    return prompt


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int = 256,
             temperature: float = 0.0, stream: bool = True) -> str:
    """Complete `prompt` (greedy at temperature 0), printing tokens as they come when `stream` is on."""
    text = render_prompt(tokenizer, prompt)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not tokenizer.chat_template).to(model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id, **sampling)
    if stream:
        sys.stdout.flush()
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def generate_batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]],
                   max_new_tokens: int, batch_size: int = 25) -> list[list[int]]:
    """Greedy completions of already-tokenized prompts, left-padded in batches; each stops at EOS."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 use_cache=True, pad_token_id=pad)
        for row in out[:, width:].tolist():
            outputs.append(row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row)
    return outputs
