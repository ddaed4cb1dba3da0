"""qlora-kit: QLoRA finetuning on a frozen 4-bit NF4 base, with our own LoRA, loop, merge and export."""

__version__ = "0.1.0"
