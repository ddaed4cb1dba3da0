"""The training loop end to end on a tiny model, and the CLI."""

import json
import math
import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file

from qlora_kit.batching import collate
from qlora_kit.config import load_recipe
from qlora_kit.data import load_examples
from qlora_kit.loss import token_loss_sum
from qlora_kit.optim import build_optimizer
from qlora_kit.train import build_model, train

from conftest import own_lines


def recipe_for(model_dir, data, out, *overrides):
    return load_recipe(None, [f"model.path={model_dir}", f"data.path={data}", f"output_dir={out}",
                              "train.seq_len=64", "train.micro_batch_size=4", "lora.r=8", "lora.alpha=16",
                              "lora.dropout=0", *overrides])


@pytest.mark.slow
def test_loss_falls_on_a_memorisation_task(tiny_llama, memorise_data, tmp_path):
    train(recipe_for(tiny_llama, memorise_data, tmp_path / "run", "train.max_steps=40", "train.lr=1e-2",
                              "train.lr_schedule=constant"))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 40
    assert losses[-1] < 0.3 * losses[0], losses


def test_metrics_and_outputs(tiny_llama, memorise_data, tmp_path):
    out = tmp_path / "run"
    train(recipe_for(tiny_llama, memorise_data, out, "train.max_steps=3", "train.micro_batch_size=2"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(tiny_llama)
    examples = load_examples(memorise_data, tokenizer, 64).dataset
    real_tokens = sum(len(e["input_ids"]) for e in examples)
    assert sum(r["tokens"] for r in records[:2]) == real_tokens  # steps 1-2 are one epoch; padding excluded
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "peak_mem_bytes"} <= r.keys()
        assert r["peak_mem_bytes"] > 10 * 2**20 and r["tokens_per_s"] > 0
    assert load_recipe(out / "recipe.yaml").train.max_steps == 3
    assert {p.name for p in (out / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}


def test_epochs_when_max_steps_is_zero(tiny_llama, memorise_data, tmp_path):
    # 4 examples, micro-batch 1, grad_accum 3: ceil(4 / 3) = 2 steps per epoch, the second one shorter.
    result = train(recipe_for(tiny_llama, memorise_data, tmp_path / "run", "train.epochs=2",
                              "train.micro_batch_size=1", "train.grad_accum=3"))
    assert result.steps == 4


def test_base_weights_are_bit_identical_after_optimizer_steps(tiny_llama, memorise_data, tmp_path):
    recipe = recipe_for(tiny_llama, memorise_data, tmp_path / "run", "optim.name=paged_adamw_8bit")
    loaded = build_model(recipe, torch.device("cpu"))
    model = loaded.model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    quant_bytes = {n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert quant_bytes and all("lora_" in n for n in lora_before)
    optimizer = build_optimizer(model, recipe.optim, 1e-2)
    batch = collate(load_examples(memorise_data, loaded.tokenizer, 64).dataset, loaded.tokenizer.pad_token_id)
    for _ in range(3):
        loss, n = token_loss_sum(model, batch)
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    for n, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            assert torch.equal(m.weight.data, quant_bytes[n]), n
    assert all(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_adapter_round_trip_gives_identical_logits(tiny_llama, memorise_data, tmp_path):
    result = train(recipe_for(tiny_llama, memorise_data, tmp_path / "run", "train.max_steps=5", "train.lr=1e-2"))
    recipe = recipe_for(tiny_llama, memorise_data, tmp_path / "eval", f"model.adapter={result.adapter_dir}")
    reloaded = build_model(recipe, torch.device("cpu"))
    ids = torch.randint(0, 250, (2, 16))
    trained = result.model.eval()
    with torch.no_grad():
        assert torch.equal(trained(ids).logits, reloaded.model.eval()(ids).logits)
        base = build_model(recipe_for(tiny_llama, memorise_data, tmp_path / "x"), torch.device("cpu"))
        assert not torch.allclose(base.model.eval()(ids).logits, trained(ids).logits)


def test_adapter_with_another_rank_is_refused(tiny_llama, memorise_data, tmp_path):
    result = train(recipe_for(tiny_llama, memorise_data, tmp_path / "run", "train.max_steps=1"))
    recipe = recipe_for(tiny_llama, memorise_data, tmp_path / "x", "lora.r=4", f"model.adapter={result.adapter_dir}")
    with pytest.raises(Exception, match=r"does not match the recipe: lora.r \(adapter 8, recipe 4\)"):
        build_model(recipe, torch.device("cpu"))


@pytest.mark.slow
def test_training_is_deterministic(tiny_llama, memorise_data, tmp_path):
    runs = [train(recipe_for(tiny_llama, memorise_data, tmp_path / f"run{i}", "train.max_steps=4",
                             "lora.dropout=0.1")) for i in range(2)]
    a, b = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_checkpointing_recomputes_the_same_dropout(tiny_llama, memorise_data, tmp_path):
    """Recomputed layers must draw the dropout masks of the first pass, or their gradients belong to another
    forward: with checkpointing on and off, the same adapter (fp32, same ops: equal to rounding)."""
    runs = [train(recipe_for(tiny_llama, memorise_data, tmp_path / f"ckpt-{on}", "train.max_steps=3",
                             "lora.dropout=0.2", "train.lr=1e-2", f"train.gradient_checkpointing={on}"))
            for on in ("true", "false")]
    a, b = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in runs)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    no_dropout = train(recipe_for(tiny_llama, memorise_data, tmp_path / "none", "train.max_steps=3",
                                  "train.lr=1e-2"))  # the control: dropout does change the result
    c = load_file(no_dropout.adapter_dir / "adapter_model.safetensors")
    assert any(not torch.allclose(a[k], c[k], rtol=1e-3, atol=1e-5) for k in a)


def test_chunked_loss_equals_the_one_pass_loss(tiny_llama, tmp_path):
    """Head + loss in chunks (recomputed in backward) give the loss and LoRA gradients of one pass."""
    from qlora_kit.batching import collate_padding_free

    model = build_model(recipe_for(tiny_llama, "unused.jsonl", tmp_path), torch.device("cpu")).model.train()
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)  # B is zero at init: make every LoRA gradient non-trivial
    gen = torch.Generator().manual_seed(0)
    examples = [{"input_ids": ids, "labels": ids, "length": len(ids)}
                for ids in (torch.randint(3, 200, (n,), generator=gen).tolist() for n in (17, 9, 30))]
    batch = collate_padding_free(examples)
    head_calls = []
    model.get_output_embeddings().register_forward_hook(lambda *_: head_calls.append(1))
    results = []
    vocab = model.get_output_embeddings().weight.shape[0]
    for chunk_bytes in (2**40, 4 * vocab * 7):  # one pass; 7 label positions per chunk
        loss, n = token_loss_sum(model, batch, chunk_bytes=chunk_bytes)
        (loss / n).backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
        model.zero_grad(set_to_none=True)
    assert len(head_calls) == 1  # the chunked pass used the head's weight, not its one-pass forward
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=0)
    for k, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][k], grad, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.slow
def test_grad_accum_equals_a_bigger_micro_batch(tiny_llama, memorise_data, tmp_path):
    """Loss is normalised by the label tokens of the whole step, so 2 x 2 == 1 x 4 (up to padding numerics)."""
    one = train(recipe_for(tiny_llama, memorise_data, tmp_path / "a", "train.max_steps=3", "train.micro_batch_size=4"))
    two = train(recipe_for(tiny_llama, memorise_data, tmp_path / "b", "train.max_steps=3", "train.micro_batch_size=2",
                           "train.grad_accum=2"))
    a, b = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in (one, two))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qlora_kit", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.slow
def test_cli_train_runs_and_refuses_to_overwrite(tiny_llama, memorise_data, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  lr: 1e-3\n")
    args = ["train", "--overwrite", recipe, f"model.path={tiny_llama}", f"data.path={memorise_data}",
            f"output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.seq_len=32"]
    first = run_cli(*args[:1], *args[2:])
    assert first.returncode == 0, first.stderr
    assert "done: 2 steps" in first.stderr and (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    again = run_cli(*args[:1], *args[2:])
    assert again.returncode == 2 and "already holds a run" in again.stderr and "--overwrite" in again.stderr


@pytest.mark.slow
def test_overwrite_replaces_a_finished_run(tiny_llama, memorise_data, tmp_path):
    recipe = recipe_for(tiny_llama, memorise_data, tmp_path / "run", "train.max_steps=2")
    train(recipe)
    train(recipe, overwrite=True)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2  # a fresh log, not appended


def test_cli_user_errors_are_one_line_and_exit_2(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("seed: 1\n")
    bad = run_cli("train", recipe, "lora.rank=8")
    assert bad.returncode == 2
    assert own_lines(bad.stderr) == ["qlora-kit: error: command line: unknown recipe key 'lora.rank'; "
                                               "did you mean 'lora.r'?"]
    debug = run_cli("--debug", "train", recipe, "lora.rank=8")
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    missing = run_cli("train", tmp_path / "nope.yaml")
    assert missing.returncode == 2 and "recipe file not found" in missing.stderr


def test_cross_entropy_sum_matches_torch():
    """Our loss (gradient written over the logits) against `F.cross_entropy(reduction="sum")`: value and the
    gradients that flow back through a head into its input and weight."""
    from qlora_kit.loss import cross_entropy_sum

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=gen)
    weight = torch.randn(101, 16, generator=gen) * 3  # large logits: exercises the log-sum-exp's stability
    targets = torch.randint(0, 101, (37,), generator=gen)
    results = []
    for loss_fn in (cross_entropy_sum, lambda z, t: torch.nn.functional.cross_entropy(z, t, reduction="sum")):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = loss_fn(h @ w.t(), targets)
        (loss * 0.5).backward()
        results.append((loss.detach(), h.grad, w.grad))
    for ours, reference in zip(*results, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_auto_compute_dtype_uses_bf16_only_where_the_gpu_has_it_natively(monkeypatch):
    """A T4 or V100 reports bf16 support only when emulation counts: those train in fp16 (simulated here)."""
    from qlora_kit.model import compute_dtype_for

    for native in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native: (
            n or including_emulation))
        expected = torch.bfloat16 if native else torch.float16
        assert compute_dtype_for("auto", torch.device("cuda")) == expected


@pytest.mark.slow
def test_fp16_training_scales_the_loss_and_survives_overflows(tiny_llama, memorise_data, tmp_path, monkeypatch):
    """fp16 compute (what GPUs without bf16 get): the loss is scaled, overflowing steps are skipped while the
    scale comes down, and they do not count as divergence. Started at 2^40, the scale overflows at once."""
    import qlora_kit.train as train_module

    monkeypatch.setattr(train_module, "FP16_INITIAL_SCALE", 2.0**40)
    out = tmp_path / "run"
    result = train(recipe_for(tiny_llama, memorise_data, out, "quant.compute_dtype=float16", "train.max_steps=40",
                              "train.max_bad_steps=2", "train.lr=1e-2"))
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 0 < len(losses) < 40  # overflowing steps were skipped (and not logged), more than max_bad_steps
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
