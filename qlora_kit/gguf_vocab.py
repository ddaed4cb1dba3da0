"""The tokenizer of a Hugging Face model as GGUF metadata that llama.cpp tokenizes with exactly as transformers does.

Two tokenizer families cover the models qlora-kit trains:
- byte-level BPE ("gpt2" in GGUF: Llama 3, Qwen2/2.5, SmolLM2): the vocabulary and merges are copied, and
  llama.cpp needs to be told which of its built-in pre-tokenizer regexes the model uses (`tokenizer.ggml.pre`).
  That is not written in tokenizer.json in a form llama.cpp reads, so, as llama.cpp's own converter does, we
  encode a fixed probe text and look the token ids' hash up in a table of known pre-tokenizers. An unknown hash
  is refused: a guessed regex would split text differently from training, silently.
- SentencePiece-style BPE with byte fallback ("llama" in GGUF: Mistral v0.x, Phi-3): llama.cpp's tokenizer
  merges the pair whose result has the highest score, so giving each token minus the rank of the merge that
  makes it reproduces BPE's merge order from tokenizer.json alone (no sentencepiece, no tokenizer.model).
Special token ids, whether BOS/EOS are added, and the chat template come from the tokenizer's behaviour as
transformers loads it, not from config fields that transformers 5 may no longer write.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from gguf import GGUFWriter, TokenType
from transformers import PreTrainedTokenizerBase

from qlora_kit.errors import UserError

# llama.cpp's probe text (convert_hf_to_gguf.py, get_vocab_base_pre), and the hashes of its token ids for the
# pre-tokenizers of the model families qlora-kit exports; the values are llama.cpp's (MIT), checked by its tests.
PROBE = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
         "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
         "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
         "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3, 3.1, 3.2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5, 2, 2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
}


def add_tokenizer(writer: GGUFWriter, tokenizer: PreTrainedTokenizerBase, model_dir: Path, vocab_size: int) -> str:
    """Write the tokenizer's metadata; return its GGUF kind ("gpt2" or "llama"). Refuses what llama.cpp
    could not reproduce with one line."""
    # The pipeline transformers built (what training tokenized with), not tokenizer.json as saved: for some model
    # types (Qwen2Tokenizer) transformers rebuilds parts of it.
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"{model_dir}: a {model.get('type')} tokenizer; GGUF export supports BPE tokenizers (Llama, "
                        "Mistral, Qwen2, Phi-3, SmolLM2)")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UserError(f"{model_dir}: the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size "
                        f"is {vocab_size}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    sentencepiece = bool(model.get("byte_fallback"))
    tokens, types, scores = _tokens(tokenizer, vocab, vocab_size, merges if sentencepiece else None)
    if sentencepiece:
        kind, pre = "llama", "default"
        writer.add_token_scores(scores)
    else:
        kind, pre = "gpt2", pre_tokenizer(spec.get("pre_tokenizer") or {}, digest_of(tokenizer), model_dir)
        writer.add_token_merges(merges)
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for what, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                           ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{what}_token_id")(token_id)
    with_specials = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and with_specials[:1] == [tokenizer.bos_token_id]
                             and plain[:1] != [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and with_specials[-1:] == [tokenizer.eos_token_id]
                             and plain[-1:] != [tokenizer.eos_token_id])
    if kind == "llama":
        # SentencePiece-style tokenizers prepend "▁" to the text; llama.cpp does so when told to.
        writer.add_add_space_prefix(tokenizer.tokenize("a")[:1] in (["▁a"], ["▁"]))
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)
    return kind


# The same pre-tokenizers recognised by their pipeline instead of their ids, for vocabularies the hash table does
# not know (a family's tokenizer with tokens added or removed): each step as (type, what it splits on), and the
# regexes as tokenizer.json writes them (llama.cpp's llama-vocab.cpp quotes these as the originals it adapts).
_LETTERS = r"[^\r\n\p{L}\p{N}]?\p{L}+"
_TAIL = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PIPELINES = {
    (("Split", r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|" + _LETTERS + r"|\p{N}{1,3}|" + _TAIL), ("ByteLevel", False)):
        "llama-bpe",
    (("Split", r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|" + _LETTERS + r"|\p{N}|" + _TAIL), ("ByteLevel", False)): "qwen2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("ByteLevel", True),): "gpt-2",
}


def digest_of(tokenizer: PreTrainedTokenizerBase) -> str:
    """llama.cpp's fingerprint of a tokenizer: the sha256 of the ids of its probe text."""
    return hashlib.sha256(str(tokenizer.encode(PROBE)).encode()).hexdigest()


def pre_tokenizer(spec: dict, digest: str, model_dir: Path) -> str:
    """llama.cpp's name for this byte-level BPE tokenizer's pre-tokenizer `spec` (see the module docstring)."""
    if digest in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[digest]
    steps = _pipeline(spec)
    if steps in PIPELINES:
        return PIPELINES[steps]
    raise UserError(f"{model_dir}: a pre-tokenizer llama.cpp does not know (probe hash {digest[:16]}, steps "
                    f"{[s[0] for s in steps]}); GGUF export knows those of "
                    f"{', '.join(sorted(set(PRE_TOKENIZERS.values())))}, and a guessed one would split text "
                    "differently from training")


def _pipeline(spec: dict) -> tuple:
    """A pre-tokenizer's steps as (type, what it splits on)."""
    steps = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    out = []
    for step in steps:
        kind = step.get("type")
        detail = {"Split": (step.get("pattern") or {}).get("Regex"), "Digits": step.get("individual_digits"),
                  "ByteLevel": step.get("use_regex")}.get(kind)
        out.append((kind, detail))
    return tuple(out)


def _tokens(tokenizer: PreTrainedTokenizerBase, vocab: dict[str, int], vocab_size: int,
            merges: list[str] | None) -> tuple[list[str], list[int], list[float]]:
    """Tokens in id order (as tokenizer.json spells them), their GGUF types, and, for SentencePiece-style
    tokenizers (`merges` given), scores for llama.cpp: -(rank of the merge that makes the token), so that merging
    the highest score first is BPE's merge order. Ids the tokenizer lacks are unused padding."""
    rank = {a + b: r for r, (a, b) in enumerate(m.split(" ", 1) for m in merges or [])}
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        token = by_id.get(i, f"[PAD{i}]")
        if i not in by_id:
            kind = TokenType.UNUSED
        elif i in added:
            kind = TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED
        elif merges is not None and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            kind = TokenType.BYTE
        else:
            kind = TokenType.NORMAL
        tokens.append(token)
        types.append(kind)
        scores.append(-float(rank.get(token, 0)) if kind == TokenType.NORMAL else 0.0)
    return tokens, types, scores
