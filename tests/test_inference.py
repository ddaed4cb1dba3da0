"""generate, eval and demo: adapters and exports used the way a user uses them."""

import json
import subprocess
import sys

import pytest
import torch

from qlora_kit.config import load_recipe
from qlora_kit.data import load_examples
from qlora_kit.evaluate import evaluate, exact_match, split_prompt_answer
from qlora_kit.formats import IGNORE
from qlora_kit.inference import load_for_inference
from qlora_kit.merge import merge
from qlora_kit.train import train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    """A tiny Llama trained long enough to answer its 4 memorised prompts, and its float16 export."""
    root = tmp_path_factory.mktemp("inference")
    data = root / "data.jsonl"
    words = ("alpha", "bravo", "delta", "tango")
    data.write_text("".join(json.dumps({"prompt": f"Reverse: {w}\n", "completion": w[::-1]}) + "\n" for w in words))
    recipe = load_recipe(None, [f"model.path={tiny_models['llama']}", f"data.path={data}", f"output_dir={root / 'run'}",
                                "train.max_steps=60", "train.lr=1e-2", "train.lr_schedule=constant", "lora.r=16",
                                "lora.alpha=32", "lora.dropout=0", "train.micro_batch_size=4"])
    result = train(recipe)
    merge(result.adapter_dir, root / "merged", dtype="float16")
    return {"adapter": result.adapter_dir, "merged": root / "merged", "data": data, "model": result.model.eval()}


def test_split_prompt_answer_takes_the_last_labelled_run_without_eos():
    ids = [1, 5, 6, 7, 2, 9, 8, 3, 2]
    labels = [IGNORE, IGNORE, 6, 7, 2, IGNORE, 8, 3, 2]
    assert split_prompt_answer(ids, labels, eos_id=2) == ([1, 5, 6, 7, 2, 9], [8, 3])


@pytest.mark.slow
def test_batched_exact_match_equals_one_at_a_time_greedy_generation(trained):
    model, tokenizer = load_for_inference(str(trained["adapter"]), CPU)
    examples = load_examples(trained["data"], tokenizer, 64)
    match, samples = exact_match(model, tokenizer, examples)
    for row, sample in zip(examples.dataset, samples, strict=True):
        prompt, answer = split_prompt_answer(row["input_ids"], row["labels"], tokenizer.eos_token_id)
        with torch.no_grad():  # independent reference: no padding, one prompt at a time
            out = model.generate(torch.tensor([prompt]), max_new_tokens=len(answer) + 2, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        out = out[: out.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in out else out
        assert sample["output"] == tokenizer.decode(out, skip_special_tokens=True).strip()
    assert match == sum(s["output"] == s["answer"] for s in samples) / 4 and match >= 0.75  # it was learned


@pytest.mark.slow
def test_eval_on_adapter_and_float16_export_agree(trained):
    results = [evaluate(*load_for_inference(str(trained[k]), CPU), str(trained["data"])) for k in ("adapter", "merged")]
    adapter, merged = results
    assert abs(adapter.loss - merged.loss) < 1e-2 and adapter.examples == 4
    assert adapter.perplexity == pytest.approx(torch.tensor(adapter.loss).exp().item())
    assert adapter.exact_match == merged.exact_match


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qlora_kit", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_eval_json_and_generate(trained):
    result = run_cli("eval", trained["adapter"], "--data", trained["data"], "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report.keys() == {"loss", "perplexity", "exact_match", "examples"} and report["examples"] == 4
    generated = run_cli("generate", trained["merged"], "--prompt", "Reverse: alpha\n", "--max-new-tokens", "8")
    assert generated.returncode == 0, generated.stderr
    assert run_cli("eval", trained["adapter"], "--data", "/nonexistent.jsonl").returncode == 2
