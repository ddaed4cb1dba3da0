"""The training loop: named setup steps, then one explicit loop (accumulate, clip, step, schedule, log, eval, save).

It runs unchanged as a plain command or under `accelerate launch`: Accelerate picks the device, wraps the model
for DDP and shards the data; everything else is written out here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from itertools import islice
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from qlora_kit import adapter as adapter_io
from qlora_kit import checkpoint as ckpt
from qlora_kit.attention import describe_attention
from qlora_kit.batching import build_loader, padded_slots
from qlora_kit.checkpoint import TrainerState
from qlora_kit.config import Recipe, save_recipe, to_dict
from qlora_kit.data import load_data
from qlora_kit.distributed import check_fsdp, fsdp_plugin, lora_state, wrap_fsdp
from qlora_kit.errors import UserError
from qlora_kit.files import check_free_space, exclusive
from qlora_kit.formats import IGNORE
from qlora_kit.fused import checkpoint_contexts
from qlora_kit.lora import add_lora, lora_dtype_for, select_targets
from qlora_kit.loss import token_loss_sum
from qlora_kit.metrics import MetricsLog, available_memory_bytes, human_bytes, peak_memory_bytes
from qlora_kit.model import LoadedModel, linear_shapes, load_quantized, load_tokenizer, quantizable_linears
from qlora_kit.offload import OffloadedLayers, decoder_layers
from qlora_kit.optim import build_optimizer, build_scheduler
from qlora_kit.preemption import Preemption
from qlora_kit.report import draw_report, open_tensorboard, write_tensorboard
from qlora_kit.sources import fingerprint
from qlora_kit.watchdog import Watchdog
from qlora_kit.zoo import resolve_model_path

# How long a process waits for the others at a collective before the run fails. Rank 0 alone tokenises the data
# (the others then read its cache) and runs `train.merge_after`: on large data or a 70B merge that outlasts
# NCCL's 10-minute default, which would kill a healthy run. A crashed rank still ends the run at once (torchrun
# stops the others).
PROCESS_GROUP_TIMEOUT = timedelta(hours=3)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    tokens: int
    peak_mem_bytes: int
    adapter_dir: Path
    final_loss: float
    model: torch.nn.Module  # the trained model (4-bit base + LoRA), unwrapped, for in-process use
    eval_loss: float | None = None  # at the end, when there is evaluation data
    checkpoint: Path | None = None  # the last checkpoint written
    preempted: bool = False  # stopped early by SIGTERM/SIGINT, after saving `checkpoint`


def build_model(recipe: Recipe, device: torch.device, model_dir: Path | None = None,
                tokenizer: PreTrainedTokenizerBase | None = None,
                read_weights: bool = True) -> tuple[LoadedModel, list[str], list[str]]:
    """Load the 4-bit base and wrap the targeted linears in LoRA (from `model.adapter` if set).

    `model_dir` and `tokenizer`, when the caller has them, save resolving `model.path` again (hashing a GGUF
    file, or a hub look-up) and reloading the tokenizer.
    Returns the model, the LoRA targets and all candidate linears (PEFT's `target_modules` needs both).
    """
    model_dir = model_dir or resolve_model_path(recipe.model.path, recipe.allow_network)
    loaded = load_quantized(model_dir, recipe.quant, device, recipe.model.trust_remote_code, tokenizer,
                            park=recipe.train.offload_base or not read_weights, read_weights=read_weights)
    candidates = quantizable_linears(loaded.model)
    targets = select_targets(candidates, recipe.lora.target_modules)
    lora_dtype = lora_dtype_for(loaded.compute_dtype)
    lora = recipe.lora
    check_lora_fits(loaded.model, targets, lora.r, lora_dtype, device)
    add_lora(loaded.model, targets, lora.r, lora.alpha, lora.dropout, lora.use_rslora, lora_dtype)
    if recipe.model.adapter:
        check_adapter_matches(recipe, Path(recipe.model.adapter), candidates, targets)
        adapter_io.load_adapter_weights(loaded.model, Path(recipe.model.adapter))
    if recipe.train.offload_base:  # from here on, each layer's 4-bit weights visit `device` only while it runs
        loaded.offload = OffloadedLayers(decoder_layers(loaded.model), device)
    return loaded, targets, candidates


def check_lora_fits(model: torch.nn.Module, targets: list[str], r: int, dtype: torch.dtype,
                    device: torch.device) -> None:
    """Refuse a rank whose LoRA weights, gradients and two fp32 Adam states cannot fit in the memory left,
    before allocating them: `lora.r=1e9` is a typo to report, not an out-of-memory crash minutes later."""
    shapes = linear_shapes(model)
    params = sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)
    needed = params * (2 * dtype.itemsize + 8)
    available = available_memory_bytes(device)
    if available is not None and needed > available:
        raise UserError(f"'lora.r': {r} needs {human_bytes(needed)} for the LoRA weights, their gradients and the "
                        f"optimizer's state ({params:,} parameters); {human_bytes(available)} of memory is free")


def check_adapter_matches(recipe: Recipe, adapter_dir: Path, candidates: list[str], targets: list[str]) -> None:
    saved = adapter_io.read_adapter_config(adapter_dir)
    ours = adapter_io.adapter_config(recipe.lora, adapter_io.peft_target_modules(targets, candidates), "")
    keys = {"r": "lora.r", "lora_alpha": "lora.alpha", "use_rslora": "lora.use_rslora",
            "target_modules": "lora.target_modules"}
    saved["target_modules"] = sorted(saved.get("target_modules") or [])
    differ = [f"{key} (adapter {saved.get(k)!r}, recipe {ours[k]!r})"
              for k, key in keys.items() if saved.get(k) != ours[k]]
    if differ:
        raise UserError(f"'model.adapter': {adapter_dir} does not match the recipe: {'; '.join(differ)}")


def train(recipe: Recipe, overwrite: bool = False, resume: str | bool | None = None) -> TrainResult:
    """Train; with `resume` (True: the latest checkpoint in output_dir, or a path) continue a stopped run exactly.

    The main process holds output_dir's lock for the whole run: a second run into it is refused at once."""
    # cpu=True without a GPU: Accelerate then forms a gloo process group under torchrun (it would not otherwise)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT)])
    out = Path(recipe.output_dir)
    check_output_dir(out)
    with exclusive(out, "'output_dir'") if accelerator.is_main_process else contextlib.nullcontext():
        return _train(recipe, accelerator, overwrite, resume)


def _train(recipe: Recipe, accelerator: Accelerator, overwrite: bool, resume: str | bool | None) -> TrainResult:
    # ---- setup: seed, the checkpoint to resume from
    main = accelerator.is_main_process
    out = Path(recipe.output_dir)
    set_seed(recipe.seed)
    t = recipe.train
    if main:
        ckpt.remove_checkpoint_leftovers(out)
    resume_from = ckpt.resolve_resume(resume, out) if resume else None
    if resume and resume_from is None and main:
        print(f"resume: {out} holds no completed step yet; starting from step 0", file=sys.stderr)
    plugin = fsdp_plugin(accelerator)
    fsdp = plugin is not None
    if fsdp and t.offload_base:
        raise UserError("train.offload_base cannot be combined with FSDP: FSDP already keeps each process's share "
                        "of the layers (with fsdp_offload_params, in CPU memory)")
    if fsdp and (t.save_every or resume_from):  # the optimizer state is sharded: rank 0's part cannot resume a run
        raise UserError("FSDP: checkpoints are not supported yet (train.save_every must be 0, no --resume); the "
                        "final adapter is saved")

    # ---- data: read, check and tokenise every row before anything is written, so bad data fails fast
    model_dir = resolve_model_path(recipe.model.path, recipe.allow_network)
    tokenizer = load_tokenizer(model_dir, recipe.model.trust_remote_code)
    with accelerator.main_process_first():  # the others then read rank 0's tokenisation from the cache
        train_data, eval_data = load_data(recipe.data, tokenizer, t.seq_len, recipe.seed, recipe.allow_network)
    data_fingerprint = fingerprint(recipe.data.path, recipe.allow_network)
    if resume_from:
        check_resumable(recipe, resume_from, data_fingerprint, accelerator.num_processes)
    if main:
        print(f"data: {train_data.summary()}" + (f"; eval: {eval_data.summary()}" if eval_data else ""),
              file=sys.stderr)
        prepare_output_dir(out, overwrite, resume_step=ckpt.checkpoint_step(resume_from) if resume_from else None)
        save_recipe(recipe, out / "recipe.yaml")

    # ---- model: 4-bit frozen base + LoRA, checkpointing
    # FSDP: the main process alone reads the weights, parked in CPU memory until FSDP shards them onto the GPUs
    loaded, targets, candidates = build_model(recipe, accelerator.device, model_dir, tokenizer,
                                              read_weights=main or not fsdp)
    model = loaded.model
    if main:
        print(f"attention: {describe_attention(model)}", file=sys.stderr)
    if t.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    if fsdp:  # before wrapping: wrong settings train garbage
        check_fsdp(model, recipe.quant.storage_dtype, plugin)
        model = wrap_fsdp(model, plugin, accelerator.device)
        if main:
            print(f"fsdp: {plugin.sharding_strategy.name} over {accelerator.num_processes} processes; weights read by "
                  "this process alone; LoRA matrices sharded as units of their own", file=sys.stderr)

    # ---- batches, optimizer, schedule
    batches = partial(build_loader, packing=recipe.data.packing, micro_batch_size=t.micro_batch_size,
                      seq_len=t.seq_len, pad_id=tokenizer.pad_token_id, seed=recipe.seed)
    loader = batches(train_data.dataset)
    eval_loader = accelerator.prepare(batches(eval_data.dataset, shuffle=False)) if eval_data else None
    optimizer = build_optimizer(model, recipe.optim, t.lr)
    if fsdp:  # wrapped already: Accelerate would wrap it again (in DDP, on CPUs)
        optimizer, loader = accelerator.prepare(optimizer, loader)
    else:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = math.ceil(len(loader) / t.grad_accum)
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, t, total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    scaler = loss_scaler(loaded.compute_dtype, accelerator.device)
    unwrapped = model.module if fsdp else accelerator.unwrap_model(model)
    write_adapter = partial(save_run_adapter, recipe, loaded, unwrapped, targets, candidates)
    checkpoint_bytes = ckpt.estimate_bytes(unwrapped)
    if main:  # a checkpoint and the final adapter must fit; better to know now than after hours of training
        check_free_space(out, 2 * checkpoint_bytes, "a checkpoint and the adapter")
    # Restored last: building the model drew random numbers (LoRA init) that the checkpoint's RNG state replaces.
    state = TrainerState(0, 0, 0)
    if resume_from:
        state = ckpt.load_checkpoint(resume_from, partial(adapter_io.load_adapter_weights, unwrapped), optimizer,
                                     scheduler, scaler, accelerator.process_index)
        if state.step >= total_steps:
            return already_finished(recipe, state.step, total_steps, resume_from, accelerator, unwrapped)
        if main:
            print(f"resuming from {resume_from} (step {state.step} of {total_steps})", file=sys.stderr)

    # ---- the loop: one iteration per optimizer step
    log = MetricsLog(out / "metrics.jsonl") if main else None
    board = open_tensorboard(out / "tensorboard", state.step) if main else None  # None without the extra
    bar = tqdm(total=total_steps, initial=state.step, disable=not (main and sys.stderr.isatty()), desc="train",
               unit="step")
    start, total_tokens, loss, eval_loss = time.perf_counter(), 0, float("nan"), None
    slots = torch.zeros(2, dtype=torch.long)  # token positions run through the model; what padding would take
    groups = micro_batch_groups(loader, t.grad_accum, state.epoch, state.consumed)
    watchdog, last_checkpoint, stop = Watchdog(t.max_bad_steps, t.spike_factor), resume_from, False
    with Preemption() as preemption:
        for step in range(state.step + 1, total_steps + 1):
            step_start = time.perf_counter()
            group, epoch, consumed = next(groups)
            # Normalise by the label tokens of the whole step on all processes: each token weighs the same.
            label_tokens = accelerator.reduce(_count(group, "labels"), "sum").item()
            loss_sum = torch.zeros((), device=accelerator.device)
            for i, batch in enumerate(group):
                sync = i == len(group) - 1  # all-reduce gradients once per step, not per micro-batch
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    batch_loss, _ = token_loss_sum(model, batch)
                    # DDP averages gradients over processes; the factor turns that average back into a sum.
                    accelerator.backward(scaler.scale(batch_loss * accelerator.num_processes / max(label_tokens, 1)))
                loss_sum += batch_loss.detach()
            scaler.unscale_(optimizer)
            # FSDP: the norm of all the shards together, the same on every process (a local one would differ)
            grad_norm = float(model.clip_grad_norm_(t.max_grad_norm or float("inf")) if fsdp else
                              accelerator.clip_grad_norm_(trainable, t.max_grad_norm or float("inf")))
            loss = accelerator.reduce(loss_sum, "sum").item() / max(label_tokens, 1)
            # fp16: gradients that overflowed at the current loss scale are the scaler's to handle (it skips the
            # step and lowers the scale), not a sign of divergence
            overflow = scaler.is_enabled() and math.isfinite(loss) and not math.isfinite(grad_norm)
            good = not overflow and watchdog.step_is_good(step, loss, grad_norm,
                                                          str(last_checkpoint) if last_checkpoint else None)
            if good:  # a non-finite step changes nothing: no update, no schedule step
                scaler.step(optimizer)
                scheduler.step()
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

            tokens = int(accelerator.reduce(_count(group, "attention_mask"), "sum").item())
            total_tokens += tokens
            step_slots = accelerator.reduce(_slots(group).to(accelerator.device), "sum").cpu()
            slots += step_slots
            seconds = time.perf_counter() - step_start
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            evaluating = eval_loader is not None and (step == total_steps
                                                      or bool(t.eval_every and step % t.eval_every == 0))
            if evaluating:
                eval_loss = evaluate(model, eval_loader, accelerator)
            if log and good and (step % t.log_every == 0 or step == total_steps or evaluating):
                record = {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                          "tokens": tokens, "slots": int(step_slots[0]), "tokens_per_s": tokens / seconds,
                          "seconds": seconds, "peak_mem_bytes": peak_memory_bytes(accelerator.device),
                          **({"eval_loss": eval_loss} if evaluating else {})}
                log.write(record)
                if board:
                    write_tensorboard(board, record)
            # Read once: a signal arriving during the save stops after the next step. On the last step, just finish.
            stop = preemption.requested and step < total_steps
            # A skipped step is not saved: after divergence the last checkpoint must be one from before it.
            if not fsdp and ((good and (step == total_steps or (t.save_every and step % t.save_every == 0)))
                             or stop):
                last_checkpoint = save_checkpoint(recipe, TrainerState(step, epoch, consumed), write_adapter,
                                                  optimizer, scheduler, scaler, accelerator, checkpoint_bytes,
                                                  data_fingerprint)
            if stop:
                break
    bar.close()
    elapsed = time.perf_counter() - start

    # ---- save the adapter (rank 0), summarise
    adapter_dir = out / "adapter"
    accelerator.wait_for_everyone()
    if main:
        log.close()
        if board:
            board.close()
    if stop:
        return stopped_early(recipe, step, total_steps, last_checkpoint, accelerator, total_tokens, loss, unwrapped)
    # FSDP: every rank takes part in gathering the LoRA weights, one matrix at a time; rank 0 writes them
    tensors = lora_state(model) if fsdp else None
    if main:
        write_adapter(adapter_dir, tensors=tensors)
        report = draw_report(out) if (out / "metrics.jsonl").stat().st_size else None  # after the adapter is safe
    if main and t.merge_after:
        from qlora_kit.merge import merge

        merge(adapter_dir, out / "merged", dtype=t.merge_dtype, overwrite=True)
    peak = peak_memory_bytes(accelerator.device)
    if main:
        computed, padded = slots.tolist()
        print(f"padding: real tokens filled {total_tokens / max(computed, 1):.1%} of the positions computed "
              f"(data.packing: {recipe.data.packing}); padded batches of the same examples: "
              f"{total_tokens / max(padded, 1):.1%}", file=sys.stderr)
        if report:
            print(f"report: {report}", file=sys.stderr)
        evaluated = f", eval loss {eval_loss:.4f}" if eval_loss is not None else ""
        print(f"done: {total_steps} steps in {elapsed:.1f} s, {total_tokens / elapsed:.0f} tokens/s, final loss "
              f"{loss:.4f}{evaluated}, peak memory {human_bytes(peak)}; adapter: {adapter_dir}, metrics: "
              f"{out / 'metrics.jsonl'}", file=sys.stderr)
    accelerator.wait_for_everyone()  # no rank tears the process group down while rank 0 still writes
    accelerator.end_training()
    return TrainResult(total_steps, elapsed, total_tokens, peak, adapter_dir, loss, unwrapped, eval_loss,
                       last_checkpoint)


def check_resumable(recipe: Recipe, checkpoint: Path, data_fingerprint: str, processes: int) -> None:
    """Refuse to resume with settings the checkpoint cannot honour (see `checkpoint.RESUMABLE`), other data or
    another number of processes (each process's share of the batches would change)."""
    trained_by = ckpt.checkpoint_processes(checkpoint)
    if trained_by != processes:
        raise UserError(f"--resume: {checkpoint} was trained by {trained_by} process(es), this run has {processes}: "
                        "each process's share of the batches would change; resume with the same number")
    saved = yaml.safe_load((checkpoint / "recipe.yaml").read_text())
    flat_saved, flat_ours = ckpt.flatten(saved), ckpt.flatten(to_dict(recipe))
    differ = ckpt.unresumable_changes(flat_saved, flat_ours)
    if differ:
        details = "; ".join(f"{k} (checkpoint {flat_saved.get(k)!r}, now {flat_ours.get(k)!r})" for k in differ)
        raise UserError(f"--resume: {checkpoint} was trained with other settings, which resuming cannot honour: "
                        f"{details}. Set them back, or start a new run from its adapter "
                        f"(model.adapter={checkpoint / 'adapter'})")
    saved_fingerprint = json.loads((checkpoint / "trainer_state.json").read_text()).get("data_fingerprint")
    if saved_fingerprint and saved_fingerprint != data_fingerprint:
        raise UserError(f"--resume: the training data ({recipe.data.path}) changed since {checkpoint} was saved, so "
                        "the batches already trained on cannot be skipped; restore the data, or start a new run from "
                        f"its adapter (model.adapter={checkpoint / 'adapter'})")


def save_checkpoint(recipe: Recipe, state: TrainerState, write_adapter, optimizer, scheduler, scaler,
                    accelerator: Accelerator, checkpoint_bytes: int, data_fingerprint: str) -> Path:
    """Rank 0 writes the checkpoint (after a free-space check) and prunes old ones; every rank gets its path."""
    out = Path(recipe.output_dir)
    rng = gather_object([ckpt.process_rng()]) if accelerator.num_processes > 1 else [ckpt.process_rng()]
    path = ckpt.checkpoints_dir(out) / f"step-{state.step}"
    if accelerator.is_main_process:
        check_free_space(ckpt.checkpoints_dir(out), checkpoint_bytes, "a checkpoint")
        path = ckpt.save_checkpoint(out, state, write_adapter, optimizer, scheduler, scaler,
                                    yaml.safe_dump(to_dict(recipe), sort_keys=False), data_fingerprint, rng)
        ckpt.prune(out, recipe.train.keep_checkpoints)
    accelerator.wait_for_everyone()
    return path


def already_finished(recipe: Recipe, step: int, total_steps: int, checkpoint: Path, accelerator: Accelerator,
                     model: torch.nn.Module) -> TrainResult:
    """`--resume` of a run that reached its last step: nothing to train; say how to train further."""
    records = [json.loads(line) for line in (Path(recipe.output_dir) / "metrics.jsonl").read_text().splitlines()
               if line.strip()] if (Path(recipe.output_dir) / "metrics.jsonl").is_file() else []
    loss = next((r["loss"] for r in reversed(records) if r.get("step") == step), float("nan"))
    if accelerator.is_main_process:
        print(f"resume: {checkpoint} is step {step} of {total_steps}: the run is already complete (final loss "
              f"{loss:.4f}); raise train.max_steps or train.epochs to train further", file=sys.stderr)
    accelerator.end_training()
    adapter = Path(recipe.output_dir) / "adapter"
    return TrainResult(step, 0.0, 0, peak_memory_bytes(accelerator.device),
                       adapter if adapter.is_dir() else checkpoint / "adapter", loss, model, None, checkpoint)


def stopped_early(recipe: Recipe, step: int, total_steps: int, checkpoint: Path | None, accelerator: Accelerator,
                  tokens: int, loss: float, model: torch.nn.Module) -> TrainResult:
    """After SIGTERM/SIGINT: say where the checkpoint is and how to continue; the caller exits 0."""
    if accelerator.is_main_process:
        print(f"stopped at step {step} of {total_steps}; checkpoint: {checkpoint}\nresume with: qlora-kit train "
              f"RECIPE --resume (or --resume {checkpoint})" if checkpoint else
              f"stopped at step {step} of {total_steps}; nothing saved (FSDP runs do not checkpoint yet)",
              file=sys.stderr)
    accelerator.end_training()
    peak = peak_memory_bytes(accelerator.device)
    adapter = checkpoint / "adapter" if checkpoint else None
    return TrainResult(step, 0.0, tokens, peak, adapter, loss, model, None, checkpoint, True)


def save_run_adapter(recipe: Recipe, loaded: LoadedModel, model: torch.nn.Module, targets: list[str],
                     candidates: list[str], adapter_dir: Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """PEFT's two files, plus the recipe and how the base was quantized (so a merge can reproduce it)."""
    base = str(loaded.path.resolve())
    config = adapter_io.adapter_config(recipe.lora, adapter_io.peft_target_modules(targets, candidates), base)
    device = next(p.device for p in model.parameters() if p.requires_grad)
    metadata = {"model_path": base, "quant": dataclasses.asdict(recipe.quant),
                "compute_dtype": str(loaded.compute_dtype).removeprefix("torch."), "quant_device": device.type}
    adapter_io.save_adapter(model, adapter_dir, config,
                            {"recipe.yaml": yaml.safe_dump(to_dict(recipe), sort_keys=False),
                             adapter_io.METADATA_NAME: json.dumps(metadata, indent=2) + "\n"}, tensors)


# fp16 gradients underflow without loss scaling; the scaler starts here and halves on every overflow.
FP16_INITIAL_SCALE = 2.0**16


def loss_scaler(compute_dtype: torch.dtype, device: torch.device) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16 compute (GPUs without native bf16); a scaler that does nothing otherwise."""
    return torch.amp.GradScaler(device.type, init_scale=FP16_INITIAL_SCALE, enabled=compute_dtype == torch.float16)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant checkpointing: works with a frozen base whose inputs need no grad, and stores the least.

    The contexts tell the LoRA layers which pass they run in, so the recompute skips work (see fused.py)."""
    kwargs = {"use_reentrant": False, "context_fn": checkpoint_contexts}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def evaluate(model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> float:
    """Mean token loss over the evaluation data on all processes, with dropout off; leaves the model training."""
    model.eval()
    sums = torch.zeros(2, device=accelerator.device)  # (loss sum, label tokens)
    with torch.no_grad():
        for batch in loader:
            loss_sum, n = token_loss_sum(model, batch)
            sums[0] += loss_sum.float()
            sums[1] += n
    model.train()
    loss_sum, n = accelerator.reduce(sums, "sum").tolist()
    return loss_sum / max(n, 1)


def micro_batch_groups(loader, grad_accum: int, epoch: int = 0, skip: int = 0):
    """Endless (group, epoch, micro-batches of the epoch consumed) with groups of `grad_accum` micro-batches; an
    epoch's last group may be shorter. The order of an epoch depends on (seed, epoch) only (`set_epoch`), so a
    resumed run starts at `epoch`, skips the `skip` micro-batches already trained on (collated, never run through
    the model) and sees exactly the batches the uninterrupted run saw."""
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        batches = islice(iter(loader), skip, None)
        consumed = skip
        while group := list(islice(batches, grad_accum)):
            consumed += len(group)
            yield group, epoch, consumed
        epoch, skip = epoch + 1, 0


def _count(group: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    if key == "labels":  # positions that predict a label: the first token of each row predicts nothing
        return sum((b["labels"][:, 1:] != IGNORE).sum() for b in group)
    return sum(b[key].sum() for b in group)


def _slots(group: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """(token positions the model computed, positions padded batches of the same examples would take)."""
    return torch.tensor([sum(b["input_ids"].numel() for b in group), sum(padded_slots(b) for b in group)])


def check_output_dir(out: Path) -> None:
    """`output_dir` must be a directory this process can write in, or a path where one can be made."""
    if out.exists() and not out.is_dir():
        raise UserError(f"'output_dir': {out} exists and is not a directory")
    existing = next(p for p in [out, *out.parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"'output_dir': {existing} is not writable")


def prepare_output_dir(out: Path, overwrite: bool, resume_step: int | None = None) -> None:
    """Refuse to train over a finished run unless asked: a user's adapter is never lost by accident.

    Resuming continues the run in place: metrics.jsonl is cut back to the checkpoint's step, then appended to.
    """
    if resume_step is not None:
        truncate_metrics(out / "metrics.jsonl", resume_step)
        return
    previous = ckpt.previous_run(out)
    if previous and not overwrite:
        raise UserError(f"'output_dir': {out} already holds a run ({', '.join(previous)}); choose another "
                        "output_dir, pass --resume to continue it, or --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)  # empty, or replaced with --overwrite: a fresh log
    if overwrite:  # the old adapter stays until the new one replaces it atomically at the end
        shutil.rmtree(ckpt.checkpoints_dir(out), ignore_errors=True)  # another run's checkpoints must not resume


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines logged after `step` (the steps the resumed run repeats); a torn last line goes too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= step and line.endswith("\n"):
                kept.append(line)
        except (ValueError, KeyError):
            pass
    path.write_text("".join(kept))
