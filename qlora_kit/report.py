"""The training report: `output_dir/report.png` drawn from metrics.jsonl, and TensorBoard event files.

Both are extras (`pip install qlora-kit[report]`): training never needs them, so without them a run says so in
one line and carries on. The picture is drawn from metrics.jsonl alone, so `qlora-kit report OUTPUT_DIR`
redraws it for any run, finished, stopped or still going.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qlora_kit.errors import UserError
from qlora_kit.metrics import human_bytes

INSTALL_HINT = "pip install 'qlora-kit[report]'"


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

