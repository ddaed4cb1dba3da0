"""What a run records: metrics.jsonl, TensorBoard events, the progress bar, `report.png` and the summary lines,
all through one object (`RunLog`) that does nothing on processes other than the main one.

TensorBoard and the picture are extras (`pip install qlora-kit[report]`): training never needs them, so without
them a run says so in one line and carries on. The picture is drawn from metrics.jsonl alone, so `qlora-kit report
OUTPUT_DIR` redraws it for any run, finished, stopped or still going.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from qlora_kit.errors import UserError
from qlora_kit.memory import human_bytes, peak_memory_bytes

INSTALL_HINT = "pip install 'qlora-kit[report]'"


@dataclass
class StepStats:
    """One optimizer step, summed over its micro-batches and processes."""

    loss: float  # mean token loss
    grad_norm: float
    good: bool  # False: skipped (non-finite loss or gradients)
    tokens: int  # real tokens, padding excluded
    positions: int  # token positions computed, padding included
    padded_positions: int  # what padded batches of the same examples would have computed
    seconds: float = 0.0


class RunLog:
    """The run's records. `active` False (processes other than the main one): every method does nothing."""

    def __init__(self, output_dir: Path, active: bool, total_steps: int, first_step: int, log_every: int,
                 device: torch.device) -> None:
        self.output_dir, self.active, self.total_steps = output_dir, active, total_steps
        self.log_every, self.device = log_every, device
        self.metrics = (output_dir / "metrics.jsonl").open("a") if active else None
        self.board = open_tensorboard(output_dir / "tensorboard", first_step) if active else None
        self.bar = tqdm(total=total_steps, initial=first_step, disable=not (active and sys.stderr.isatty()),
                        desc="train", unit="step")
        self.tokens = self.positions = self.padded_positions = 0  # totals, on every process

    def step(self, step: int, stats: StepStats, lr: float, eval_loss: float | None) -> None:
        """Count the step; log it every `log_every` steps, at the end and with an evaluation (never a skipped one:
        metrics.jsonl holds the steps that updated the adapter)."""
        self.tokens += stats.tokens
        self.positions += stats.positions
        self.padded_positions += stats.padded_positions
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{stats.loss:.4f}")
        due = step % self.log_every == 0 or step == self.total_steps or eval_loss is not None
        if not (self.active and stats.good and due):
            return
        record = {"step": step, "loss": stats.loss, "lr": lr, "grad_norm": stats.grad_norm, "tokens": stats.tokens,
                  "positions": stats.positions, "tokens_per_s": stats.tokens / stats.seconds,
                  "seconds": stats.seconds, "peak_mem_bytes": peak_memory_bytes(self.device),
                  **({"eval_loss": eval_loss} if eval_loss is not None else {})}
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()  # a crash keeps every step logged so far
        if self.board:
            write_tensorboard(self.board, record)

    def close(self) -> None:
        self.bar.close()
        if self.active:
            self.metrics.close()
            if self.board:
                self.board.close()

    def summary(self, steps: int, seconds: float, loss: float, eval_loss: float | None, peak: int,
                packing: str, adapter_dir: Path) -> None:
        """The report picture (after the adapter is safe) and the closing lines."""
        if not self.active:
            return
        report = draw_report(self.output_dir) if (self.output_dir / "metrics.jsonl").stat().st_size else None
        print(f"padding: real tokens filled {self.tokens / max(self.positions, 1):.1%} of the positions computed "
              f"(data.packing: {packing}); padded batches of the same examples: "
              f"{self.tokens / max(self.padded_positions, 1):.1%}", file=sys.stderr)
        if report:
            print(f"report: {report}", file=sys.stderr)
        evaluated = f", eval loss {eval_loss:.4f}" if eval_loss is not None else ""
        print(f"done: {steps} steps in {seconds:.1f} s, {self.tokens / seconds:.0f} tokens/s, final loss "
              f"{loss:.4f}{evaluated}, peak memory {human_bytes(peak)}; adapter: {adapter_dir}, metrics: "
              f"{self.output_dir / 'metrics.jsonl'}", file=sys.stderr)


def open_tensorboard(log_dir: Path, first_step: int = 0):
    """A SummaryWriter, or None when tensorboard is not installed; `first_step` drops a resumed run's redone steps."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(log_dir), purge_step=first_step + 1 if first_step else None)


def write_tensorboard(writer, record: dict) -> None:
    for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
            writer.add_scalar(f"train/{key}" if key != "eval_loss" else "eval/loss", value, record["step"])


def read_metrics(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{output_dir}: no metrics.jsonl here; is this a training output_dir?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def headline(records: list[dict]) -> str:
    """One line for the title: steps, final loss and eval loss, mean throughput, peak memory."""
    last = records[-1]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    seconds = sum(r["seconds"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    parts = [f"{last['step']} steps", f"final loss {last['loss']:.4f}"]
    parts += [f"eval loss {evals[-1]:.4f}"] if evals else []
    parts += [f"{tokens / seconds:.0f} tokens/s" if seconds else "", f"peak memory "
              f"{human_bytes(max(r['peak_mem_bytes'] for r in records))}"]
    return ", ".join(p for p in parts if p)


def draw_report(output_dir: Path) -> Path | None:
    """Draw `output_dir/report.png`; None (after one line saying how to get it) when matplotlib is missing."""
    records = read_metrics(output_dir)
    if not records:
        raise UserError(f"{output_dir}: metrics.jsonl is empty; nothing to draw")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed, works on headless training machines
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"report.png skipped: matplotlib is not installed ({INSTALL_HINT})", file=sys.stderr)
        return None
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    (loss_ax, lr_ax), (speed_ax, mem_ax) = axes
    loss_ax.plot(steps, [r["loss"] for r in records], label="train")
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if evals:
        loss_ax.plot(*zip(*evals, strict=True), "o-", label="eval")
    loss_ax.set(title="loss", ylabel="mean token cross-entropy")
    loss_ax.legend()
    lr_ax.plot(steps, [r["lr"] for r in records])
    lr_ax.set(title="learning rate")
    speed_ax.plot(steps, [r["tokens_per_s"] for r in records])
    speed_ax.set(title="throughput", ylabel="tokens/s", xlabel="step")
    mem_ax.plot(steps, [r["peak_mem_bytes"] / 2**30 for r in records])
    mem_ax.set(title="peak memory", ylabel="GiB", xlabel="step")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(headline(records))
    fig.tight_layout()
    path = Path(output_dir) / "report.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

