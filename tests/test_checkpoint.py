"""Checkpoints, exact resume after SIGKILL, SIGTERM save-and-exit, the divergence watchdog, readable failures."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_kit import checkpoint as ckpt
from qlora_kit import preemption as preemption_module
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
                             None, None, "")
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


def test_a_ctrl_c_swallowed_before_training_still_stops_the_run(monkeypatch):
    """Library code between the CLI and the loop may catch the KeyboardInterrupt (as a worker pool's cleanup
    did once, under load): the run must still not start."""
    monkeypatch.setattr(preemption_module, "_early", None)
    before = signal.getsignal(signal.SIGINT)
    try:
        preemption_module.watch_early_interrupts()
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode
        except KeyboardInterrupt:
            pass  # swallowed, as the library did
        with pytest.raises(KeyboardInterrupt), Preemption():
            pytest.fail("training started after a Ctrl-C")
    finally:
        signal.signal(signal.SIGINT, before)


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


# ------------------------------------------------------------------------------ locks, damage, resume rules


@pytest.mark.slow
def test_a_second_run_into_a_busy_output_dir_is_refused_naming_the_first(tiny_llama, memorise_data, tmp_path,
                                                                         capsys):
    out = tmp_path / "run"
    args = overrides(tiny_llama, memorise_data, out, "train.max_steps=1000", "train.save_every=1")
    first = cli(tmp_path, *args)
    try:
        wait_for(lambda: ckpt.latest_checkpoint(out) is not None, first)
        recipe = tmp_path / "recipe.yaml"
        for extra in ([], ["--resume"], ["--overwrite"]):
            assert main(["train", str(recipe), *args, *extra]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"is in use by another qlora-kit process (pid {first.pid})" in err[0], err
    finally:
        first.kill()  # SIGKILL: the lock must not outlive its process
        first.wait()
    steps = ckpt.checkpoint_step(ckpt.latest_checkpoint(out))
    assert main(["train", str(tmp_path / "recipe.yaml"), *overrides(tiny_llama, memorise_data, out,
                 f"train.max_steps={steps + 1}", "train.save_every=1"), "--resume"]) == 0


@pytest.mark.slow
def test_a_zero_filled_checkpoint_file_falls_back_to_the_previous_checkpoint(tiny_llama, memorise_data, tmp_path,
                                                                              capsys):
    straight = train(load_recipe(None, overrides(tiny_llama, memorise_data, tmp_path / "a", "train.max_steps=3")))
    out = tmp_path / "b"
    recipe = load_recipe(None, overrides(tiny_llama, memorise_data, out, "train.max_steps=3", "train.save_every=1",
                                         "train.keep_checkpoints=3"))
    train(recipe)
    damaged = out / "checkpoints" / "step-3" / "optimizer.safetensors"
    damaged.write_bytes(bytes(damaged.stat().st_size))  # what a crash before the data reached the disk leaves
    assert ckpt.is_complete(damaged.parent)  # the sizes alone cannot tell
    capsys.readouterr()
    resumed = train(recipe, resume=True)
    assert f"skipping damaged checkpoint {damaged.parent}: optimizer.safetensors does not match its checksum" in (
        capsys.readouterr().err)
    assert resumed.steps == 3 and [r[0] for r in losses(out)] == [1, 2, 3]
    ours, reference = (load_file(d / "adapter_model.safetensors") for d in (resumed.adapter_dir, straight.adapter_dir))
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    damaged.write_bytes(bytes(damaged.stat().st_size))  # the resumed run saved a sound step-3; damage it again
    with pytest.raises(UserError, match="step-3 is damaged: optimizer.safetensors does not match its checksum"):
        ckpt.resolve_resume(str(damaged.parent), out)


@pytest.mark.parametrize("change, key", [
    ("train.lr=0.1", "train.lr"), ("train.micro_batch_size=2", "train.micro_batch_size"), ("seed=1", "seed"),
    ("train.seq_len=32", "train.seq_len"), ("optim.name=adamw", "optim.name"), ("train.warmup_steps=1",
                                                                                 "train.warmup_steps"),
    ("lora.dropout=0.2", "lora.dropout"), ("data.packing=pack", "data.packing"),
    ("other data", "the training data"), ("edited data", "the training data")])
def test_resume_refuses_changes_it_cannot_honour(tiny_llama, memorise_data, tmp_path, capsys, change, key):
    out = tmp_path / "run"
    args = overrides(tiny_llama, memorise_data, out, "train.max_steps=2", "train.save_every=1")
    train(load_recipe(None, args))
    recipe_before = (out / "recipe.yaml").read_text()
    metrics_before = (out / "metrics.jsonl").read_text()
    if change == "other data":
        change = f"data.path={write_rows(tmp_path / 'other.jsonl', 'other')}"
        key = "data.path"
    elif change == "edited data":
        memorise_data.write_text(memorise_data.read_text().replace("alpha", "omega"))
        change = "train.max_steps=3"
    capsys.readouterr()
    assert main(["train", recipe_file(tmp_path), *args, change, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qlora-kit: error: --resume:") and key in err[0], err
    assert (out / "recipe.yaml").read_text() == recipe_before  # nothing recorded that the run did not do
    assert (out / "metrics.jsonl").read_text() == metrics_before


def recipe_file(tmp_path):
    """A recipe file with the default seed: CLI runs then train what `load_recipe(None, ...)` runs trained."""
    (tmp_path / "r.yaml").write_text("seed: 42\n")
    return str(tmp_path / "r.yaml")


def write_rows(path, word):
    path.write_text(json.dumps({"prompt": f"Reverse: {word}\n", "completion": word[::-1]}) + "\n")
    return path


@pytest.mark.slow
def test_resume_honours_what_it_allows_and_records_it(tiny_llama, memorise_data, tmp_path):
    out = tmp_path / "run"
    train(load_recipe(None, overrides(tiny_llama, memorise_data, out, "train.max_steps=2", "train.save_every=1")))
    resumed = train(load_recipe(None, overrides(tiny_llama, memorise_data, out, "train.max_steps=4",
                                                "train.save_every=3", "train.keep_checkpoints=1",
                                                "train.max_grad_norm=0.5")), resume=True)
    assert resumed.steps == 4 and [p.name for p in ckpt.list_checkpoints(out)] == ["step-4"]
    saved = load_recipe(out / "recipe.yaml")
    assert (saved.train.max_steps, saved.train.save_every, saved.train.max_grad_norm) == (4, 3, 0.5)


@pytest.mark.slow
def test_leftovers_of_interrupted_saves_and_deletions_are_removed(tiny_llama, memorise_data, tmp_path):
    out = tmp_path / "run"
    args = overrides(tiny_llama, memorise_data, out, "train.max_steps=2", "train.save_every=1")
    train(load_recipe(None, args))
    root = out / "checkpoints"
    for leftover in (".step-1.deleting", ".step-3.tmp-abc", "step-7"):  # a second signal during a prune or save
        (root / leftover).mkdir(exist_ok=True)
        (root / leftover / "optimizer.safetensors").write_bytes(b"part")
    assert ckpt.resolve_resume(True, out).name == "step-2"
    train(load_recipe(None, [*args[:-2], "train.max_steps=3", "train.save_every=1"]), resume=True)
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-3"]


def test_a_run_stopped_before_its_first_step_blocks_nothing(tiny_llama, memorise_data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")  # SIGTERM during loading left an empty log
    assert ckpt.previous_run(out) == []
    args = overrides(tiny_llama, memorise_data, out, "train.max_steps=1")
    assert main(["train", recipe_file(tmp_path), *args, "--resume"]) == 0
    assert "holds no completed step yet; starting from step 0" in capsys.readouterr().err
    (out / "metrics.jsonl").write_text("")
    shutil.rmtree(out / "adapter")
    shutil.rmtree(out / "checkpoints")
    assert main(["train", recipe_file(tmp_path), *args]) == 0


def test_resuming_a_finished_run_says_so_and_trains_nothing(tiny_llama, memorise_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = overrides(tiny_llama, memorise_data, out, "train.max_steps=2")
    first = train(load_recipe(None, args))
    metrics = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", recipe_file(tmp_path), *args, "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"the run is already complete (final loss {first.final_loss:.4f})" in err and "nan" not in err
    assert (out / "metrics.jsonl").read_text() == metrics
