"""Score a GGUF export with llama.cpp itself (through llama-cpp-python, an optional extra).

The prompts are the evaluation's own (the training pipeline's chat template and masking), decoded to text and
tokenized by llama.cpp's tokenizer from the GGUF metadata, as llama.cpp, Ollama or LM Studio would; the answer
is llama.cpp's greedy completion, cut at end-of-generation. So the score covers the exported tokenizer, weights
and metadata together; `prompt_ids_differ` counts the prompts llama.cpp tokenized differently from transformers.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from qlora_kit.data import Examples
from qlora_kit.evaluate import prompts_and_answers

INSTALL_HINT = "pip install llama-cpp-python builds it (llama.cpp from source: minutes on a small CPU)"


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def load_llama(path: Path, n_ctx: int = 2048, logits_all: bool = False, vocab_only: bool = False):
    """llama.cpp's model from a GGUF file, on this machine's cores. llama.cpp logs from C to the process's stderr
    (`verbose=False` does not silence every line), so stderr is closed while it loads."""
    from llama_cpp import Llama

    with _quiet_stderr():
        return Llama(str(path), n_ctx=n_ctx, n_threads=os.cpu_count(), logits_all=logits_all, vocab_only=vocab_only,
                     verbose=False, seed=0)


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def exact_match_llama_cpp(path: Path, tokenizer: PreTrainedTokenizerBase, examples: Examples) -> dict:
    """Exact match of llama.cpp's greedy answers on `examples`, as `evaluate.exact_match` scores transformers."""
    from llama_cpp import llama_vocab_is_eog

    pairs, budget = prompts_and_answers(examples, tokenizer.eos_token_id)
    llm = load_llama(path, n_ctx=max(len(p) for p, _ in pairs) + budget + 8)
    hits, differ, samples = 0, 0, []
    for prompt_ids, answer_ids in pairs:
        text = tokenizer.decode(prompt_ids)
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        differ += ids != prompt_ids
        out = []
        for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            if llama_vocab_is_eog(llm._model.vocab, token):  # EOS, and chat models' end-of-turn tokens
                break
            out.append(token)
            if len(out) >= budget:
                break
        output = llm.detokenize(out).decode("utf-8", errors="replace").strip()
        answer = tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
        hits += output == answer
        samples.append({"answer": answer, "output": output})
    return {"exact_match": hits / len(pairs), "examples": len(pairs), "prompt_ids_differ": differ,
            "samples": samples[:3]}
