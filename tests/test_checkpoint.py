"""Checkpoints, exact resume after SIGKILL, SIGTERM save-and-exit, the divergence watchdog, readable failures."""

import json
import os
import signal
import subprocess
import sys
import time

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_kit import checkpoint as ckpt
from qlora_kit.cli import main, out_of_memory_message
from qlora_kit.config import load_recipe
from qlora_kit.errors import TrainingDiverged, UserError
from qlora_kit.files import check_free_space
from qlora_kit.preemption import Preemption
from qlora_kit.train import train
from qlora_kit.watchdog import Watchdog

# Micro-batch 1 over 4 examples: 4 steps per epoch, so checkpoints every 3 steps land mid-epoch and the resumed
# run must skip the right micro-batches; dropout 0.1 makes the restored RNG state matter.
RUN = ["train.seq_len=64", "train.micro_batch_size=1", "lora.r=8", "lora.alpha=16", "lora.dropout=0.1"]


def overrides(model_dir, data, out, *extra):
    return [f"model.path={model_dir}", f"data.path={data}", f"output_dir={out}", *RUN, *extra]


def cli(tmp_path, *args):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("seed: 7\n")
    return subprocess.Popen([sys.executable, "-m", "qlora_kit", "train", str(recipe), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.01)


def losses(out):
    return [(r["step"], r["loss"], r["tokens"]) for r in map(json.loads, (out / "metrics.jsonl").open())]


def test_sigkill_then_resume_gives_a_bit_identical_adapter(tiny_llama, memorise_data, tmp_path):
    args = overrides(tiny_llama, memorise_data, tmp_path / "killed", "train.max_steps=10", "train.save_every=3")
    killed = cli(tmp_path, *args)
    wait_for(lambda: ckpt.latest_checkpoint(tmp_path / "killed") is not None, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "killed" / "adapter").exists()
    resumed = cli(tmp_path, *args, "--resume")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "resuming from" in stderr, stderr

    reference = overrides(tiny_llama, memorise_data, tmp_path / "reference", "train.max_steps=10", "seed=7")
    train(load_recipe(None, reference))
    a, b = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("killed", "reference"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "killed") == losses(tmp_path / "reference")  # same batches, same losses, no gaps


def test_sigterm_saves_a_checkpoint_and_exits_0(tiny_llama, memorise_data, tmp_path):
    out = tmp_path / "run"
    run = cli(tmp_path, *overrides(tiny_llama, memorise_data, out, "train.max_steps=1000"))
    wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 1, run)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    latest = ckpt.latest_checkpoint(out)
    assert latest is not None and f"checkpoint: {latest}" in stderr and "--resume" in stderr
    assert ckpt.checkpoint_step(latest) == losses(out)[-1][0] < 1000


def test_a_second_signal_exits_at_once(tiny_llama, memorise_data, tmp_path):
    out = tmp_path / "run"
    run = cli(tmp_path, *overrides(tiny_llama, memorise_data, out, "train.max_steps=1000"))
    wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 1, run)
    run.send_signal(signal.SIGTERM)
    run.send_signal(signal.SIGINT)
    run.communicate(timeout=120)
    # Both arrive before either handler runs, and Python runs pending handlers in signal-number order, so the
    # second one handled may be either: it exits with 128 + its number instead of saving (0).
    assert run.returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM)
    assert ckpt.latest_checkpoint(out) is None


def test_watchdog_counts_bad_steps_in_a_row_and_warns_on_spikes(capsys):
    watchdog = Watchdog(max_bad_steps=2, spike_factor=5.0)
    assert [watchdog.step_is_good(i, loss, 1.0, None) for i, loss in enumerate([2.0, 2.0, float("nan"), 2.0])] == [
        True, True, False, True]  # a good step resets the count
    assert watchdog.step_is_good(5, 11.0, 1.0, None) and "5.5x the running average" in capsys.readouterr().err
    assert not watchdog.step_is_good(6, 1.0, float("inf"), None)
    assert not watchdog.step_is_good(7, float("nan"), float("nan"), None)
    with pytest.raises(TrainingDiverged, match="3 steps in a row.*no checkpoint was saved"):
        watchdog.step_is_good(8, float("nan"), 1.0, None)


@pytest.mark.parametrize("name", [bnb.optim.PagedAdamW32bit, bnb.optim.PagedAdamW8bit, torch.optim.AdamW])
def test_optimizer_state_round_trips_through_safetensors_exactly(name, tmp_path):
    """bitsandbytes keeps nested `__bnb_optimizer_quant_state__` dicts (8-bit: uint8 states, qmap, absmax) and an
    int step; torch keeps a tensor step. After a save and load, the next steps must match bit for bit."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 80)), torch.nn.Parameter(torch.randn(16))]  # 8-bit needs >= 4096

    def steps(optimizer, n):
        for _ in range(n):
            sum((p.sin() ** 2).sum() for p in params).backward()
            optimizer.step()
            optimizer.zero_grad()

    optimizer = name(params, lr=1e-2)
    steps(optimizer, 2)
    meta, tensors = ckpt.split_tensors(optimizer.state_dict(), "")
    save_file(tensors, tmp_path / "o.safetensors")
    json_meta = json.loads(json.dumps(meta))
    saved_params = [p.detach().clone() for p in params]
    steps(optimizer, 2)
    expected = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, s in zip(params, saved_params, strict=True):
            p.copy_(s)
    fresh = name(params, lr=1e-2)
    fresh.load_state_dict(ckpt.join_tensors(json_meta, load_file(tmp_path / "o.safetensors")))
    steps(fresh, 2)
    assert all(torch.equal(p, e) for p, e in zip(params, expected, strict=True))


def test_partial_and_corrupted_checkpoints_are_ignored(tiny_llama, memorise_data, tmp_path):
    out = tmp_path / "run"
    recipe = load_recipe(None, overrides(tiny_llama, memorise_data, out, "train.max_steps=4", "train.save_every=1",
                                         "train.keep_checkpoints=3"))
    train(recipe)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-2", "step-3", "step-4"]  # keep_checkpoints
    (out / "checkpoints" / "step-4" / "optimizer.safetensors").write_bytes(b"truncated")  # marker lists the size
    partial = out / "checkpoints" / "step-9"
    partial.mkdir()  # a save killed before its marker was written (a real one is a hidden temp dir until renamed)
    assert ckpt.latest_checkpoint(out) == out / "checkpoints" / "step-3"

    def fails(directory):
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        ckpt.save_checkpoint(out, ckpt.TrainerState(5, 1, 1), fails, torch.optim.SGD([torch.zeros(1)], lr=1),
                             None, "")
    assert not (out / "checkpoints" / "step-5").exists() and not list((out / "checkpoints").glob(".step-*"))
    resumed = train(recipe, resume=True)  # from step-3: redoes step 4
    assert resumed.steps == 4 and [r[0] for r in losses(out)] == [1, 2, 3, 4]


def test_non_finite_loss_skips_steps_then_stops_keeping_the_last_good_checkpoint(tiny_llama, memorise_data,
                                                                                 tmp_path):
    # lr 1e30: Adam's first update makes the LoRA weights ~1e30, so every later forward pass overflows to NaN.
    out = tmp_path / "run"
    recipe = load_recipe(None, overrides(tiny_llama, memorise_data, out, "train.max_steps=20", "train.save_every=1",
                                         "train.lr=1e30", "train.lr_schedule=constant", "lora.dropout=0"))
    with pytest.raises(TrainingDiverged, match=r"4 steps in a row .* last good checkpoint: .*step-1$"):
        train(recipe)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-1"]
    weights = load_file(out / "checkpoints" / "step-1" / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert [r[0] for r in losses(out)] == [1]


def test_resume_with_an_incompatible_recipe_is_refused(tiny_llama, memorise_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(load_recipe(None, overrides(tiny_llama, memorise_data, out, "train.max_steps=1")))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("seed: 42\n")
    capsys.readouterr()
    code = main(["train", str(recipe), *overrides(tiny_llama, memorise_data, out, "lora.r=4", "quant.quant_type=fp4",
                                                  "train.max_steps=5"), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "lora.r (checkpoint 8, now 4)" in err[0] and "quant.quant_type (checkpoint 'nf4', now 'fp4')" in err[0]
    assert main(["train", str(recipe), *overrides(tiny_llama, memorise_data, out, "train.max_steps=2"),
                 "--resume"]) == 0  # a longer run is compatible
    capsys.readouterr()
    adapter = f"model.adapter={out / 'adapter'}"  # an adapter whose shape does not fit the recipe's LoRA
    assert main(["train", str(recipe), *overrides(tiny_llama, memorise_data, tmp_path / "x", "lora.r=4", adapter)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("qlora-kit: error: ") and "lora.r (adapter 8, recipe 4)" in err[-1]


def test_user_mistakes_exit_2_with_one_line(tiny_llama, memorise_data, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("seed: 42\n")
    (tmp_path / "empty").mkdir()
    finished = tmp_path / "finished"
    (finished / "adapter").mkdir(parents=True)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "metrics.jsonl").write_text('{"step": 1}\n')  # steps were run, no checkpoint survived
    cases = {
        "data.path": overrides(tiny_llama, tmp_path / "missing.jsonl", tmp_path / "a"),
        "no adapter_config.json": overrides(tiny_llama, memorise_data, tmp_path / "b",
                                            f"model.adapter={tmp_path / 'empty'}"),
        "a hub id needs allow_network": overrides("someone/some-model", memorise_data, tmp_path / "c"),
        "already holds a run": overrides(tiny_llama, memorise_data, finished),
        "no complete, undamaged checkpoint": [*overrides(tiny_llama, memorise_data, tmp_path / "d"), "--resume"],
    }
    for expected, args in cases.items():
        assert main(["train", str(recipe), *args]) == 2, expected
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith("qlora-kit: error: ") and expected in lines[-1], lines
        assert not any("Traceback" in line for line in lines)
    with pytest.raises(UserError):  # --debug shows the traceback
        main(["--debug", "train", str(recipe), *cases["no complete, undamaged checkpoint"]])


def test_first_signal_only_requests_a_stop_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with Preemption() as preemption:
        assert not preemption.requested
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to the main thread before the next bytecode
        assert preemption.signal == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_out_of_memory_message_names_the_settings_to_lower():
    recipe = load_recipe(None, ["train.micro_batch_size=8", "train.seq_len=4096", "train.gradient_checkpointing=false"])
    message = out_of_memory_message(recipe)
    assert "train.micro_batch_size (now 8" in message and "train.seq_len (now 4096)" in message
    assert "train.gradient_checkpointing=true" in message


def test_not_enough_disk_space_is_refused(tmp_path):
    with pytest.raises(UserError, match="not enough free disk space"):
        check_free_space(tmp_path, 1 << 60, "a checkpoint")  # an exabyte


def test_report_png_and_tensorboard_events_are_written(tiny_llama, memorise_data, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(load_recipe(None, overrides(tiny_llama, memorise_data, out, "train.max_steps=3")))
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert logged == [(s, pytest.approx(loss, rel=1e-6)) for s, loss, _ in losses(out)]
    (out / "report.png").unlink()
    capsys.readouterr()
    assert main(["report", str(out)]) == 0 and (out / "report.png").is_file()
    assert "3 steps, final loss" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2  # no metrics.jsonl there
