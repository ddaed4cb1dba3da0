"""Check a freshly written GGUF file before it is published, by readers that share no code with the writer.

1. Tensors and metadata: the `gguf` reader finds every planned tensor with its name, shape and type, holding
   the bytes that were written; what each type's rounding cost (measured on those bytes, against the merged
   float32 tensor) is within that type's bound; the sizes, epsilon and rope base that transformers reads from
   the metadata are the model's.
2. Tokenizer: the tokenizer transformers builds from the GGUF's metadata gives the same ids as the model's own
   tokenizer on sample texts, chat template applied.
3. Logits (models up to merge's size limit): the model transformers loads from the GGUF (its own dequantizers
   and tensor-name map, q/k permutation undone) against the reference: the adapter on its 4-bit base, or the
   source model; f16/bf16 within merge's tolerance for that dtype; q8_0/q4_0 report the difference and the
   perplexity change, which are what those types trade away.
4. llama.cpp, when `llama_cpp` (llama-cpp-python) is installed: its tokenizer and its logits on the same texts.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from qlora_kit.merge import LOGIT_CHECK_MAX_BYTES, LOGIT_TOLERANCE, adapter_reference
from qlora_kit.model import load_config

# Worst |dequantized - input| relative to the tensor's largest |value|: half a step of each format (fp16 keeps 11
# significant bits, bf16 8; q8_0 half of a block's max over 127; q4_0 a block's max over 8, since its 16 levels
# run from -8 to +7 steps and a value opposite the block's max is clipped at +7; plus their fp16 scale's rounding).
ROUNDING_BOUND = {gguf.GGMLQuantizationType.F16: 1e-3, gguf.GGMLQuantizationType.BF16: 8e-3,
                  gguf.GGMLQuantizationType.Q8_0: 5e-3, gguf.GGMLQuantizationType.Q4_0: 0.13,
                  gguf.GGMLQuantizationType.F32: 0.0}
LOGIT_DTYPE = {"f16": torch.float16, "bf16": torch.bfloat16}
SAMPLES = [
    "The quick brown fox jumps over the lazy dog. It was 3:45 pm on July 4, 1976.",
    "def add(a, b):\n    return a + b  # two spaces, a tab\tand newlines\n\n",
    "Ünïcödé, 日本語のテキスト, émojis 🦙🚀 and numbers 1234567890 3.14159.",
]
CHAT = [{"role": "user", "content": "Write this date in compact form: March 3, 2021"},
        {"role": "assistant", "content": "2021-03-03"}]


def sample_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The checks' texts: plain samples, and a conversation through the chat template when there is one."""
    texts = list(SAMPLES)
    if isinstance(tokenizer.chat_template, str):
        texts.append(tokenizer.apply_chat_template(CHAT, tokenize=False))
    return texts


def written_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).view(np.uint8).data).hexdigest()


def _file_digest(path: Path, offset: int, size: int, chunk: int = 16 * 2**20) -> str:
    """sha256 of a byte range, read in chunks: hashing through the reader's memory map would leave the whole file
    resident (mapped pages count until unmapped), and the check should cost what the export does."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while size > 0:
            block = f.read(min(chunk, size))
            digest.update(block)
            size -= len(block)
    return digest.hexdigest()


def check_export(path: Path, plan: list, digests: dict[str, str], report, inputs, model_dir: Path,
                 tokenizer: PreTrainedTokenizerBase, logit_check_max_bytes: int = LOGIT_CHECK_MAX_BYTES) -> None:
    """Fill `report.checks` and mark `report` failed where the file is not what was meant."""
    _check_tensors(path, plan, digests, report)
    config = _check_config(path, model_dir, report)
    texts = sample_texts(tokenizer)
    _check_tokenizer(path, tokenizer, texts, report)
    if sum(p.nbytes for p in plan) <= logit_check_max_bytes:  # loads the whole model twice, by design
        _check_logits(path, config, tokenizer, texts, report, inputs, model_dir)
    _check_llama_cpp(path, tokenizer, texts, report)


def _fail(report, message: str) -> None:
    report.passed = False
    report.failures.append(message)


def _check_tensors(path: Path, plan: list, digests: dict[str, str], report) -> None:
    reader = gguf.GGUFReader(path)
    found = {t.name: t for t in reader.tensors}
    for p in plan:
        if not p.name:
            continue
        t = found.pop(p.name, None)
        if t is None:
            _fail(report, f"{p.name}: missing from the file")
        elif t.tensor_type != p.qtype or tuple(int(d) for d in reversed(t.shape)) != p.shape:
            _fail(report, f"{p.name}: {t.tensor_type.name} {list(t.shape)} in the file, {p.qtype.name} {p.shape} meant")
        elif _file_digest(path, t.data_offset, t.n_bytes) != digests[p.name]:
            _fail(report, f"{p.name}: the bytes read back differ from those written")
        elif not report.tensors[p.name] <= ROUNDING_BOUND[p.qtype]:
            _fail(report, f"{p.name}: {p.qtype.name} rounding error {report.tensors[p.name]:.2e} "
                          f"(bound {ROUNDING_BOUND[p.qtype]:.0e})")
    for name in found:
        _fail(report, f"{name}: in the file but not planned")
    report.checks["tensors"] = {"count": len(reader.tensors),
                                "worst_rounding": max(report.tensors.values(), default=0.0)}


CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")


def _check_config(path: Path, model_dir: Path, report) -> PretrainedConfig:
    """The model's sizes, norm epsilon and rope base as transformers reads them from the GGUF's metadata; returns
    that config with the model's rope scaling, which transformers' GGUF reader drops (llama.cpp reads it)."""
    ours, theirs = load_config(model_dir), AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    fields = {f: (getattr(ours, f, None), getattr(theirs, f, None)) for f in CONFIG_FIELDS}
    fields["rope_theta"] = tuple((c.rope_parameters or {}).get("rope_theta") for c in (ours, theirs))
    wrong = {f: pair for f, pair in fields.items() if pair[0] is not None and pair[0] != pair[1]
             and not (isinstance(pair[0], float) and math.isclose(pair[0], pair[1] or 0.0, rel_tol=1e-6))}
    report.checks["config_transformers"] = {"fields": len(fields), "differ": {f: list(v) for f, v in wrong.items()}}
    if wrong:
        _fail(report, f"the GGUF's metadata reads back differently: {wrong}")
    theirs.rope_parameters = ours.rope_parameters
    return theirs


def _check_tokenizer(path: Path, tokenizer: PreTrainedTokenizerBase, texts: list[str], report) -> None:
    from_gguf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    same = sum(from_gguf(t, add_special_tokens=False)["input_ids"] ==
               tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)
    report.checks["tokenizer_transformers"] = {"texts": len(texts), "same_ids": same}
    if same != len(texts):
        _fail(report, f"the GGUF tokenizer (read by transformers) differs on {len(texts) - same}/{len(texts)} texts")


def _check_logits(path: Path, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, texts: list[str],
                  report, inputs, model_dir: Path) -> None:
    cpu = torch.device("cpu")
    reference = (adapter_reference(inputs, cpu) if inputs is not None
                 else AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    exported = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                    config=config)
    diff, biggest, nll_ref, nll_gguf, count = 0.0, 0.0, 0.0, 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            ours, theirs = exported.eval()(ids).logits.float(), reference.eval()(ids).logits.float()
            diff, biggest = max(diff, (ours - theirs).abs().max().item()), max(biggest, theirs.abs().max().item())
            targets = ids[0, 1:]
            nll_ref += torch.nn.functional.cross_entropy(theirs[0, :-1], targets, reduction="sum").item()
            nll_gguf += torch.nn.functional.cross_entropy(ours[0, :-1], targets, reduction="sum").item()
            count += len(targets)
    ppl_ref, ppl_gguf = math.exp(nll_ref / count), math.exp(nll_gguf / count)
    report.checks["logits_transformers"] = {"max_abs_diff": diff, "max_abs_logit": biggest, "tokens": count,
                                            "perplexity_reference": ppl_ref, "perplexity_gguf": ppl_gguf}
    if not math.isfinite(diff) or not math.isfinite(ppl_gguf):
        _fail(report, "the GGUF model computes non-finite logits")
    elif report.type in LOGIT_DTYPE and not diff <= LOGIT_TOLERANCE[LOGIT_DTYPE[report.type]] * biggest:
        _fail(report, f"logits differ by {diff:.2e} (max |logit| {biggest:.2f})")


def _check_llama_cpp(path: Path, tokenizer: PreTrainedTokenizerBase, texts: list[str], report) -> None:
    """Tokenization by llama.cpp itself; recorded, and a mismatch fails the export (llama.cpp is the consumer)."""
    from qlora_kit.llama_cpp_eval import INSTALL_HINT, llama_cpp_available, load_llama

    if not llama_cpp_available():
        report.checks["llama_cpp"] = f"not installed; {INSTALL_HINT}"
        return
    llm = load_llama(path, vocab_only=True)
    same = sum(llm.tokenize(t.encode(), add_bos=False, special=True) ==
               tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)
    report.checks["llama_cpp"] = {"texts": len(texts), "same_ids": same}
    if same != len(texts):
        _fail(report, f"llama.cpp tokenizes {len(texts) - same}/{len(texts)} sample texts differently")
