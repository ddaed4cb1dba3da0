"""The training loop: named setup steps, then one explicit loop (accumulate, clip, step, schedule, log, eval, save).

It runs unchanged as a plain command or under `accelerate launch`: Accelerate picks the device, forms the process
group and shards the data (qlora-kit wraps the model for FSDP itself, see distributed.py); everything else is
written out here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
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
from transformers import PreTrainedTokenizerBase

from qlora_kit import adapter as adapter_io
from qlora_kit import checkpoint as ckpt
from qlora_kit.attention import describe_attention
from qlora_kit.batching import build_loader, padded_positions
from qlora_kit.checkpoint import TrainerState
from qlora_kit.config import Recipe, save_recipe, to_dict
from qlora_kit.data import Examples, load_data
from qlora_kit.distributed import check_fsdp, fsdp_plugin, lora_state, wrap_fsdp
from qlora_kit.errors import UserError
from qlora_kit.files import check_free_space, exclusive
from qlora_kit.formats import IGNORE
from qlora_kit.fused import checkpoint_contexts
from qlora_kit.lora import add_lora, lora_dtype_for, select_targets
from qlora_kit.loss import token_loss_sum
from qlora_kit.memory import available_memory_bytes, human_bytes, peak_memory_bytes
from qlora_kit.model import LoadedModel, load_quantized, load_tokenizer, lora_shapes
from qlora_kit.model_paths import resolve_model_path
from qlora_kit.offload import OffloadedLayers, decoder_layers
from qlora_kit.optim import build_optimizer, build_scheduler
from qlora_kit.preemption import Preemption
from qlora_kit.report import RunLog, StepStats
from qlora_kit.sources import fingerprint
from qlora_kit.watchdog import Watchdog

# How long a process waits for the others at a collective before the run fails. Rank 0 alone tokenises the data
# (the others then read its cache) and runs `train.merge_after`: on large data or a 70B merge that outlasts
# NCCL's 10-minute default, which would kill a healthy run. A crashed rank still ends the run at once (torchrun
# stops the others).
PROCESS_GROUP_TIMEOUT = timedelta(hours=3)
# fp16 gradients underflow without loss scaling; the scaler starts here and halves on every overflow.
FP16_INITIAL_SCALE = 2.0**16


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


@dataclass
class Run:
    """Everything the loop uses, made by the setup steps."""

    recipe: Recipe
    accelerator: Accelerator
    loaded: LoadedModel
    model: torch.nn.Module  # as the loop calls it: wrapped by DDP or FSDP when distributed
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loader: DataLoader
    eval_loader: DataLoader | None
    total_steps: int
    fsdp: bool
    data_fingerprint: str
    checkpoint_bytes: int

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.loaded.model

    def evaluates(self, step: int) -> bool:
        every = self.recipe.train.eval_every
        return self.eval_loader is not None and (step == self.total_steps or bool(every and step % every == 0))

    def saves(self, step: int, good: bool) -> bool:
        """Checkpoint after this step? A skipped step is not saved: after divergence the last checkpoint must be
        one from before it. FSDP runs do not checkpoint (their optimizer state is sharded)."""
        every = self.recipe.train.save_every
        return not self.fsdp and good and (step == self.total_steps or bool(every and step % every == 0))


def train(recipe: Recipe, overwrite: bool = False, resume: str | bool | None = None) -> TrainResult:
    """Train; with `resume` (True: the latest checkpoint in output_dir, or a path) continue a stopped run exactly.

    The main process holds output_dir's lock for the whole run: a second run into it is refused at once."""
    # cpu=True without a GPU: Accelerate then forms a gloo process group under torchrun (it would not otherwise)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT)])
    ckpt.check_output_dir(Path(recipe.output_dir))
    with exclusive(recipe.output_dir, "'output_dir'") if accelerator.is_main_process else contextlib.nullcontext():
        return _train(recipe, accelerator, overwrite, resume)


def _train(recipe: Recipe, accelerator: Accelerator, overwrite: bool, resume: str | bool | None) -> TrainResult:
    set_seed(recipe.seed)
    resume_from = resume_point(recipe, accelerator, resume)
    tokenizer, model_dir, (train_data, eval_data) = prepare_data(recipe, accelerator)
    data_fingerprint = fingerprint(recipe.data.path, recipe.allow_network)
    if resume_from:
        ckpt.check_resumable(recipe, resume_from, data_fingerprint, accelerator.num_processes)
    prepare_output(recipe, accelerator, overwrite, resume_from, train_data, eval_data)
    run = prepare_run(recipe, accelerator, model_dir, tokenizer, train_data, eval_data, data_fingerprint)
    state = TrainerState(0, 0, 0)
    if resume_from:  # last: building the model drew random numbers (LoRA init) the checkpoint's RNG state replaces
        state = restore(run, resume_from)
        if state.step >= run.total_steps:
            return already_finished(run, state.step, resume_from)

    # ---- the loop: one iteration per optimizer step
    t, start = recipe.train, time.perf_counter()
    log = RunLog(Path(recipe.output_dir), accelerator.is_main_process, run.total_steps, state.step, t.log_every,
                 accelerator.device)
    groups = micro_batch_groups(run.loader, t.grad_accum, state.epoch, state.consumed)
    watchdog, last_checkpoint, stats, eval_loss = Watchdog(t.max_bad_steps, t.spike_factor), resume_from, None, None
    with Preemption() as preemption:
        for step in range(state.step + 1, run.total_steps + 1):
            step_start = time.perf_counter()
            group, epoch, consumed = next(groups)
            stats = optimizer_step(run, group, step, watchdog, last_checkpoint)
            stats.seconds = time.perf_counter() - step_start
            evaluated = evaluate(run.model, run.eval_loader, accelerator) if run.evaluates(step) else None
            eval_loss = evaluated if evaluated is not None else eval_loss
            log.step(step, stats, run.scheduler.get_last_lr()[0], evaluated)
            # Read once: a signal arriving during the save stops after the next step. On the last step, just finish.
            stop = preemption.requested and step < run.total_steps
            if run.saves(step, stats.good) or (stop and not run.fsdp):
                last_checkpoint = save_checkpoint(run, TrainerState(step, epoch, consumed))
            if stop:
                log.close()
                return stopped_early(run, step, last_checkpoint, log.tokens, stats.loss)
    log.close()
    return finish(run, log, time.perf_counter() - start, stats.loss if stats else float("nan"), eval_loss,
                  last_checkpoint)


# ---------------------------------------------------------------------------------------------- setup steps


def resume_point(recipe: Recipe, accelerator: Accelerator, resume: str | bool | None) -> Path | None:
    """The checkpoint to continue from (None: start afresh), after clearing what killed saves left behind."""
    out = Path(recipe.output_dir)
    if accelerator.is_main_process:
        ckpt.remove_checkpoint_leftovers(out)
    resume_from = ckpt.resolve_resume(resume, out) if resume else None
    if resume and resume_from is None and accelerator.is_main_process:
        print(f"resume: {out} holds no completed step yet; starting from step 0", file=sys.stderr)
    fsdp = fsdp_plugin(accelerator) is not None
    if fsdp and recipe.train.offload_base:
        raise UserError("train.offload_base cannot be combined with FSDP: FSDP already keeps each process's share "
                        "of the layers (with fsdp_offload_params, in CPU memory)")
    if fsdp and (recipe.train.save_every or resume_from):  # the optimizer state is sharded: rank 0's part cannot
        raise UserError("FSDP: checkpoints are not supported yet (train.save_every must be 0, no --resume); the "
                        "final adapter is saved")
    return resume_from


def prepare_data(recipe: Recipe, accelerator: Accelerator):
    """Tokenizer, model directory, and the training and evaluation examples: every row read, checked and tokenised
    before anything is written, so bad data fails fast."""
    model_dir = resolve_model_path(recipe.model.path, recipe.allow_network)
    tokenizer = load_tokenizer(model_dir, recipe.model.trust_remote_code)
    with accelerator.main_process_first():  # the others then read rank 0's tokenisation from the cache
        data = load_data(recipe.data, tokenizer, recipe.train.seq_len, recipe.seed, recipe.allow_network)
    return tokenizer, model_dir, data


def prepare_output(recipe: Recipe, accelerator: Accelerator, overwrite: bool, resume_from: Path | None,
                   train_data: Examples, eval_data: Examples | None) -> None:
    """Say what data the run trains on, and make output_dir ready for it (the first thing written)."""
    if accelerator.is_main_process:
        print(f"data: {train_data.summary()}" + (f"; eval: {eval_data.summary()}" if eval_data else ""),
              file=sys.stderr)
        out = Path(recipe.output_dir)
        ckpt.prepare_output_dir(out, overwrite, ckpt.checkpoint_step(resume_from) if resume_from else None)
        save_recipe(recipe, out / "recipe.yaml")


def prepare_run(recipe: Recipe, accelerator: Accelerator, model_dir: Path, tokenizer: PreTrainedTokenizerBase,
                train_data: Examples, eval_data: Examples | None, data_fingerprint: str) -> Run:
    """The model (4-bit base + LoRA, checkpointing, wrapped for the processes), batches, optimizer, schedule."""
    t, main = recipe.train, accelerator.is_main_process
    plugin = fsdp_plugin(accelerator)
    # FSDP: the main process alone reads the weights, kept in CPU memory until FSDP shards them onto the GPUs
    loaded = build_model(recipe, accelerator.device, model_dir, tokenizer, read_weights=main or plugin is None,
                         keep_4bit_on_host=plugin is not None)
    model = loaded.model
    if main:
        print(f"attention: {describe_attention(model)}", file=sys.stderr)
    if t.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    if plugin:
        check_fsdp(model, recipe.quant.storage_dtype, plugin)  # before wrapping: wrong settings train garbage
        model = wrap_fsdp(model, plugin, accelerator.device)
        if main:
            print(f"fsdp: {plugin.sharding_strategy.name} over {accelerator.num_processes} processes; weights read by "
                  "this process alone; LoRA matrices sharded as units of their own", file=sys.stderr)
    batches = partial(build_loader, packing=recipe.data.packing, micro_batch_size=t.micro_batch_size,
                      seq_len=t.seq_len, pad_id=tokenizer.pad_token_id, seed=recipe.seed)
    loader = batches(train_data.dataset)
    eval_loader = accelerator.prepare(batches(eval_data.dataset, shuffle=False)) if eval_data else None
    optimizer = build_optimizer(model, recipe.optim, t.lr)
    if plugin:  # wrapped already: Accelerate would wrap it again (in DDP, on CPUs)
        optimizer, loader = accelerator.prepare(optimizer, loader)
    else:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    total_steps = t.max_steps or t.epochs * math.ceil(len(loader) / t.grad_accum)
    scaler = torch.amp.GradScaler(accelerator.device.type, init_scale=FP16_INITIAL_SCALE,
                                  enabled=loaded.compute_dtype == torch.float16)  # fp16 only: GPUs without bf16
    run = Run(recipe, accelerator, loaded, model, optimizer, build_scheduler(optimizer, t, total_steps), scaler,
              loader, eval_loader, total_steps, plugin is not None, data_fingerprint,
              ckpt.estimate_bytes(loaded.model))
    if main:  # a checkpoint and the final adapter must fit; better to know now than after hours of training
        check_free_space(Path(recipe.output_dir), 2 * run.checkpoint_bytes, "a checkpoint and the adapter")
    return run


def build_model(recipe: Recipe, device: torch.device, model_dir: Path | None = None,
                tokenizer: PreTrainedTokenizerBase | None = None, read_weights: bool = True,
                keep_4bit_on_host: bool = False) -> LoadedModel:
    """Load the 4-bit base and wrap the targeted linears in LoRA (from `model.adapter` if set).

    `model_dir` and `tokenizer`, when the caller has them, save resolving `model.path` again (hashing a GGUF
    file, or a hub look-up) and reloading the tokenizer. `read_weights`, `keep_4bit_on_host`: see `load_quantized`.
    """
    model_dir = model_dir or resolve_model_path(recipe.model.path, recipe.allow_network)
    loaded = load_quantized(model_dir, recipe.quant, device, recipe.model.trust_remote_code, tokenizer,
                            keep_4bit_on_host=recipe.train.offload_base or keep_4bit_on_host,
                            read_weights=read_weights)
    loaded.linears = list(lora_shapes(loaded.model))
    loaded.targets = select_targets(loaded.linears, recipe.lora.target_modules)
    lora, lora_dtype = recipe.lora, lora_dtype_for(loaded.compute_dtype)
    check_lora_fits(loaded.model, loaded.targets, lora.r, lora_dtype, device)
    add_lora(loaded.model, loaded.targets, lora.r, lora.alpha, lora.dropout, lora.use_rslora, lora_dtype)
    if recipe.model.adapter:
        check_adapter_matches(recipe, Path(recipe.model.adapter), loaded.linears, loaded.targets)
        adapter_io.load_adapter_weights(loaded.model, Path(recipe.model.adapter))
    if recipe.train.offload_base:  # from here on, each layer's 4-bit weights visit `device` only while it runs
        loaded.offload = OffloadedLayers(decoder_layers(loaded.model), device)
    return loaded


def check_lora_fits(model: torch.nn.Module, targets: list[str], r: int, dtype: torch.dtype,
                    device: torch.device) -> None:
    """Refuse a rank whose LoRA weights, gradients and two fp32 Adam states cannot fit in the memory left,
    before allocating them: `lora.r=1e9` is a typo to report, not an out-of-memory crash minutes later."""
    shapes = lora_shapes(model)
    params = sum(r * copies * (d_in + d_out) for copies, d_in, d_out in (shapes[t] for t in targets))
    needed = params * (2 * dtype.itemsize + 8)
    available = available_memory_bytes(device)
    if available is not None and needed > available:
        raise UserError(f"'lora.r': {r} needs {human_bytes(needed)} for the LoRA weights, their gradients and the "
                        f"optimizer's state ({params:,} parameters); {human_bytes(available)} of memory is free")


def check_adapter_matches(recipe: Recipe, adapter_dir: Path, candidates: list[str], targets: list[str]) -> None:
    saved = adapter_io.read_adapter_config(adapter_dir)
    modules, parameters = adapter_io.peft_targets(targets, candidates)
    ours = adapter_io.adapter_config(recipe.lora, modules, "", parameters)
    keys = {"r": "lora.r", "lora_alpha": "lora.alpha", "use_rslora": "lora.use_rslora",
            "target_modules": "lora.target_modules", "target_parameters": "lora.target_modules"}
    saved["target_modules"] = sorted(saved.get("target_modules") or [])
    saved["target_parameters"] = sorted(saved.get("target_parameters") or [])
    ours["target_parameters"] = sorted(ours.get("target_parameters") or [])
    differ = [f"{key} (adapter {saved.get(k)!r}, recipe {ours[k]!r})"
              for k, key in keys.items() if saved.get(k) != ours[k]]
    if differ:
        raise UserError(f"'model.adapter': {adapter_dir} does not match the recipe: {'; '.join(differ)}")


def restore(run: Run, checkpoint: Path) -> TrainerState:
    """Adapter, optimizer, schedule, loss scale and this process's RNG states from `checkpoint`."""
    state = ckpt.load_checkpoint(checkpoint, partial(adapter_io.load_adapter_weights, run.unwrapped), run.optimizer,
                                 run.scheduler, run.scaler, run.accelerator.process_index)
    if run.accelerator.is_main_process and state.step < run.total_steps:
        print(f"resuming from {checkpoint} (step {state.step} of {run.total_steps})", file=sys.stderr)
    return state


# -------------------------------------------------------------------------------------------- one step, eval


def optimizer_step(run: Run, group: list[dict[str, torch.Tensor]], step: int, watchdog: Watchdog,
                   last_checkpoint: Path | None) -> StepStats:
    """Forward and backward over the step's micro-batches, clip, then update, or skip a non-finite step."""
    accelerator, model, scaler = run.accelerator, run.model, run.scaler
    max_norm = run.recipe.train.max_grad_norm or float("inf")
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
    scaler.unscale_(run.optimizer)
    # FSDP: the norm of all the shards together, the same on every process (a local one would differ)
    grad_norm = float(model.clip_grad_norm_(max_norm) if run.fsdp else
                      accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm))
    loss = accelerator.reduce(loss_sum, "sum").item() / max(label_tokens, 1)
    # fp16: gradients that overflowed at the current loss scale are the scaler's to handle (it skips the step and
    # lowers the scale), not a sign of divergence
    overflow = scaler.is_enabled() and math.isfinite(loss) and not math.isfinite(grad_norm)
    good = not overflow and watchdog.step_is_good(step, loss, grad_norm, str(last_checkpoint or "") or None)
    if good:  # a non-finite step changes nothing: no update, no schedule step
        scaler.step(run.optimizer)
        run.scheduler.step()
    scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    tokens = int(accelerator.reduce(_count(group, "attention_mask"), "sum").item())
    positions = accelerator.reduce(_positions(group).to(accelerator.device), "sum").tolist()
    return StepStats(loss, grad_norm, good, tokens, int(positions[0]), int(positions[1]))


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


def _positions(group: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """(token positions the model computed, positions padded batches of the same examples would take)."""
    return torch.tensor([sum(b["input_ids"].numel() for b in group), sum(padded_positions(b) for b in group)])


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant checkpointing: works with a frozen base whose inputs need no grad, and stores the least.

    The contexts tell the LoRA layers which pass they run in, so the recompute skips work (see fused.py)."""
    kwargs = {"use_reentrant": False, "context_fn": checkpoint_contexts}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# ------------------------------------------------------------------------------------------ saving, endings


def save_checkpoint(run: Run, state: TrainerState) -> Path:
    """Rank 0 writes the checkpoint (after a free-space check) and prunes old ones; every rank gets its path."""
    out, accelerator = Path(run.recipe.output_dir), run.accelerator
    rng = gather_object([ckpt.process_rng()]) if accelerator.num_processes > 1 else [ckpt.process_rng()]
    path = ckpt.checkpoints_dir(out) / f"step-{state.step}"
    if accelerator.is_main_process:
        check_free_space(ckpt.checkpoints_dir(out), run.checkpoint_bytes, "a checkpoint")
        path = ckpt.save_checkpoint(out, state, partial(save_run_adapter, run.recipe, run.loaded), run.optimizer,
                                    run.scheduler, run.scaler, yaml.safe_dump(to_dict(run.recipe), sort_keys=False),
                                    run.data_fingerprint, rng)
        ckpt.prune(out, run.recipe.train.keep_checkpoints)
    accelerator.wait_for_everyone()
    return path


def save_run_adapter(recipe: Recipe, loaded: LoadedModel, adapter_dir: Path,
                     tensors: dict[str, torch.Tensor] | None = None) -> None:
    """PEFT's two files, plus the recipe and how the base was quantized (so a merge can reproduce it).
    `tensors`: the LoRA weights, when the model holds only a shard of them (FSDP)."""
    base = str(loaded.path.resolve())
    modules, parameters = adapter_io.peft_targets(loaded.targets, loaded.linears)
    config = adapter_io.adapter_config(recipe.lora, modules, base, parameters)
    device = next(p.device for p in loaded.model.parameters() if p.requires_grad)
    metadata = {"model_path": base, "quant": dataclasses.asdict(recipe.quant),
                "compute_dtype": str(loaded.compute_dtype).removeprefix("torch."), "quant_device": device.type}
    adapter_io.save_adapter(loaded.model, adapter_dir, config,
                            {"recipe.yaml": yaml.safe_dump(to_dict(recipe), sort_keys=False),
                             adapter_io.METADATA_NAME: json.dumps(metadata, indent=2) + "\n"}, tensors)


def finish(run: Run, log: RunLog, seconds: float, loss: float, eval_loss: float | None,
           checkpoint: Path | None) -> TrainResult:
    """The final adapter (gathered first under FSDP), the optional merge, the summary."""
    recipe, accelerator = run.recipe, run.accelerator
    adapter_dir = Path(recipe.output_dir) / "adapter"
    accelerator.wait_for_everyone()
    tensors = lora_state(run.model) if run.fsdp else None  # every rank takes part; one LoRA matrix at a time
    if accelerator.is_main_process:
        save_run_adapter(recipe, run.loaded, adapter_dir, tensors=tensors)
    if accelerator.is_main_process and recipe.train.merge_after:
        from qlora_kit.merge import merge

        merge(adapter_dir, Path(recipe.output_dir) / "merged", dtype=recipe.train.merge_dtype, overwrite=True)
    peak = peak_memory_bytes(accelerator.device)
    log.summary(run.total_steps, seconds, loss, eval_loss, peak, recipe.data.packing, adapter_dir)
    accelerator.wait_for_everyone()  # no rank tears the process group down while rank 0 still writes
    accelerator.end_training()
    return TrainResult(run.total_steps, seconds, log.tokens, peak, adapter_dir, loss, run.unwrapped, eval_loss,
                       checkpoint)


def stopped_early(run: Run, step: int, checkpoint: Path | None, tokens: int, loss: float) -> TrainResult:
    """After SIGTERM/SIGINT: say where the checkpoint is and how to continue; the caller exits 0."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        print(f"stopped at step {step} of {run.total_steps}; checkpoint: {checkpoint}\nresume with: qlora-kit train "
              f"RECIPE --resume (or --resume {checkpoint})" if checkpoint else
              f"stopped at step {step} of {run.total_steps}; nothing saved (FSDP runs do not checkpoint yet)",
              file=sys.stderr)
    accelerator.end_training()
    peak = peak_memory_bytes(accelerator.device)
    adapter = checkpoint / "adapter" if checkpoint else None
    return TrainResult(step, 0.0, tokens, peak, adapter, loss, run.unwrapped, None, checkpoint, True)


def already_finished(run: Run, step: int, checkpoint: Path) -> TrainResult:
    """`--resume` of a run that reached its last step: nothing to train; say how to train further."""
    out, accelerator = Path(run.recipe.output_dir), run.accelerator
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
               if line.strip()] if (out / "metrics.jsonl").is_file() else []
    loss = next((r["loss"] for r in reversed(records) if r.get("step") == step), float("nan"))
    if accelerator.is_main_process:
        print(f"resume: {checkpoint} is step {step} of {run.total_steps}: the run is already complete (final loss "
              f"{loss:.4f}); raise train.max_steps or train.epochs to train further", file=sys.stderr)
    accelerator.end_training()
    adapter = out / "adapter"
    return TrainResult(step, 0.0, 0, peak_memory_bytes(accelerator.device),
                       adapter if adapter.is_dir() else checkpoint / "adapter", loss, run.unwrapped, None, checkpoint)
