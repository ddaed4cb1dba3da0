"""Merge an adapter into its base and export a plain Hugging Face model, streamed shard by shard.

    W_merged = cast(W_base.float() + scale * B.float() @ A.float())          (added in fp32, cast once)

W_base is, by default, the weight the adapter was trained against: the original weight through the same 4-bit
quantize -> dequantize round trip training used (`--base dequantized`). Merging into the original 16-bit
weight instead (`--base original`) gives a model the adapter never saw; the report shows what that costs.
The merged model is never re-quantized.

Memory: one input shard (memory-mapped) + one output shard + the adapter, whatever the model size. Every
merged linear is checked on random inputs against `W_base @ x + lora(x)`, and, when the model is small
enough, the exported model's logits against the adapter on the 4-bit base; `merge_report.json` says how close.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from qlora_kit import adapter as adapter_io
from qlora_kit import experts
from qlora_kit.config import QuantConfig
from qlora_kit.cpu import return_large_frees_to_os
from qlora_kit.errors import MergeCheckError, UserError
from qlora_kit.files import check_free_space, exclusive, remove_leftovers, staged_dir
from qlora_kit.inference import load_adapter_model
from qlora_kit.memory import peak_memory_bytes
from qlora_kit.model import checkpoint_files, default_device, linear_shapes, lora_shapes, meta_model
from qlora_kit.model_paths import resolve_model_path
from qlora_kit.nf4 import quantize_roundtrip

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Per-layer parity bound, relative to the layer's largest output: casting once to the output dtype costs
# about one rounding (eps / 2) per weight; fp32 differs only by summation order.
LAYER_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Logit bound, relative to the largest logit, after every layer's rounding has compounded.
LOGIT_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}
FP16_MAX = 65504.0
MAX_SHARD_BYTES = 2 * 2**30
LOGIT_CHECK_MAX_BYTES = 4 * 2**30  # full-model logit check only when base + export fit comfortably in RAM


@dataclass
class MergeInputs:
    """Everything the merge needs to know, read from the adapter directory (and `--model`)."""

    base_path: Path
    adapter_dir: Path
    loras: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A, B)
    scale: float
    quantized: set[str]  # linear layers that were 4-bit in training
    quant: QuantConfig
    compute_dtype: torch.dtype
    quant_device: torch.device
    model_type: str = ""
    experts: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # MoE expert projections (experts.py)


@dataclass
class MergeReport:
    dtype: str
    base: str
    layers: dict[str, float] = field(default_factory=dict)  # max relative error per merged linear
    logits_max_abs_diff: float | None = None
    logits_max_abs: float | None = None
    quantization_error: dict[str, float] = field(default_factory=dict)  # --base original only
    seconds: float = 0.0
    peak_mem_bytes: int = 0
    passed: bool = True
    failures: list[str] = field(default_factory=list)


def read_merge_inputs(adapter_dir: Path, model_path: str | None = None) -> MergeInputs:
    """Read and check the adapter against its base's shapes (the base's config only: no weights are read)."""
    adapter = adapter_io.read_adapter(adapter_dir)
    base_path = resolve_model_path(adapter.base_path(model_path))
    quant = adapter.quant()
    compute = adapter.metadata.get("compute_dtype", "float32" if quant.compute_dtype == "auto" else quant.compute_dtype)
    if compute not in DTYPES:
        raise UserError(f"{adapter.path / adapter_io.METADATA_NAME}: unknown compute_dtype {compute!r}")
    device = torch.device("cuda" if adapter.metadata.get("quant_device") == "cuda" else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        device = torch.device("cpu")  # same algorithm; bit-identity with a GPU-trained run is then not promised
    meta = meta_model(base_path)
    experts.check_supported(meta)
    adapter.check_fits(lora_shapes(meta), str(base_path))
    return MergeInputs(base_path, adapter.path, adapter.pairs, adapter.scale, set(linear_shapes(meta)), quant,
                       DTYPES[compute], device, meta.config.model_type, experts.expert_shapes(meta))


def merge(adapter_dir: Path, out_dir: Path, dtype: str = "float16", base: str = "dequantized",
          model_path: str | None = None, overwrite: bool = False, check: bool = True,
          max_shard_bytes: int = MAX_SHARD_BYTES, logit_check_max_bytes: int = LOGIT_CHECK_MAX_BYTES) -> MergeReport:
    """Write the merged model to `out_dir` atomically; raise `MergeCheckError` if the parity check fails."""
    start = time.perf_counter()
    return_large_frees_to_os()
    out_dir, out_dtype = Path(out_dir), DTYPES[dtype]
    if out_dir.exists() and not overwrite:
        raise UserError(f"--out: {out_dir} already exists; pass --overwrite to replace it")
    inputs = read_merge_inputs(Path(adapter_dir), model_path)
    check_out_dir(out_dir, inputs)
    with exclusive(out_dir, "--out"):
        remove_leftovers(out_dir)
        check_free_space(out_dir.parent, _export_bytes(inputs.base_path, out_dtype), "the export")
        report = MergeReport(dtype=dtype, base=base)
        with staged_dir(out_dir) as tmp:
            _write_weights(inputs, tmp, out_dtype, base, report, check, max_shard_bytes)
            _write_config_and_tokenizer(inputs.base_path, tmp, dtype)
            if check and base == "dequantized" and _checkpoint_bytes(inputs.base_path) <= logit_check_max_bytes:
                _check_logits(inputs, tmp, out_dtype, report)
            report.seconds = time.perf_counter() - start
            report.peak_mem_bytes = peak_memory_bytes(torch.device("cpu"))
            (tmp / "merge_report.json").write_text(json.dumps(report.__dict__, indent=2) + "\n")
            if not report.passed:
                rejected = out_dir.with_name(out_dir.name + ".rejected")
                shutil.rmtree(rejected, ignore_errors=True)
                tmp.rename(rejected)
                raise MergeCheckError(f"merge parity check failed ({'; '.join(report.failures[:3])}); the rejected "
                                      f"export and its report are in {rejected}")
    return report


def check_out_dir(out_dir: Path, inputs: MergeInputs) -> None:
    """Refuse an export that would replace or sit in what it is made from: the base model, the adapter, or the
    run that holds the adapter. Inside that run, a new directory or an earlier export may be written (as
    `train.merge_after` writes `output_dir/merged`), nothing else of the run replaced. The same holds for
    `OUT.rejected`, where a failed check puts the export."""
    sources = {"the base model": inputs.base_path.resolve(), "the adapter": inputs.adapter_dir.resolve()}
    run = next((d for d in inputs.adapter_dir.resolve().parents
                if (d / "metrics.jsonl").is_file() or (d / "checkpoints").is_dir()), None)
    for target in (out_dir, out_dir.with_name(out_dir.name + ".rejected")):
        out = target.resolve()
        for what, path in sources.items():
            if out == path or out in path.parents:
                raise UserError(f"--out: {out_dir} would replace {what} ({path}); choose another directory")
            if path in out.parents:
                raise UserError(f"--out: {out_dir} lies inside {what} ({path}); choose another directory")
        if run is not None and (out == run or out in run.parents):
            raise UserError(f"--out: {out_dir} would replace the run that holds the adapter ({run})")
        if run is not None and run in out.parents and out.exists() and not (out / "merge_report.json").is_file():
            raise UserError(f"--out: {out_dir} would replace part of the run that holds the adapter ({run}); "
                            "choose a new directory")


def _write_weights(inputs: MergeInputs, out: Path, out_dtype: torch.dtype, base: str, report: MergeReport,
                   check: bool, max_shard_bytes: int) -> None:
    """Stream input shards, merge, and write output shards of at most `max_shard_bytes` plus the index."""
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, n_shards, total_bytes = 0, 0, 0

    def flush() -> None:
        nonlocal shard, shard_bytes, n_shards, total_bytes
        n_shards += 1
        total_bytes += shard_bytes
        name = f"model-{n_shards:05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, shard_bytes = {}, 0

    for name, tensor in merged_tensors(inputs, out_dtype, base, report, check):
        if shard and shard_bytes + tensor.nbytes > max_shard_bytes:
            flush()
        shard[name] = tensor
        shard_bytes += tensor.nbytes
    if shard:
        flush()
    if n_shards == 1:
        (out / "model-00001.safetensors").rename(out / "model.safetensors")
    else:
        for old in sorted(set(weight_map.values())):  # HF's names say the shard count: model-00001-of-00003
            new = old.replace(".safetensors", f"-of-{n_shards:05d}.safetensors")
            (out / old).rename(out / new)
        weight_map = {k: v.replace(".safetensors", f"-of-{n_shards:05d}.safetensors") for k, v in weight_map.items()}
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def merged_tensors(inputs: MergeInputs, out_dtype: torch.dtype | None, base: str = "dequantized",
                   report: MergeReport | None = None, check: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the merged model, in checkpoint order, one at a time: input shards are memory-mapped
    and nothing is kept, so a consumer that writes each tensor out holds one of them at a time.
    `out_dtype=None`: merged weights in float32, every other tensor as stored (for a consumer that casts)."""
    report = report if report is not None else MergeReport(dtype=str(out_dtype), base=base)
    expert_merge = ExpertMerge(inputs, out_dtype, base, report, check)
    for file in checkpoint_files(inputs.base_path):
        with safe_open(inputs.base_path / file, framework="pt", device="cpu") as f:
            for name in f.keys():
                tensor = expert_merge(name, f.get_tensor(name))
                if tensor is None:
                    tensor = _merged_tensor(inputs, name, f.get_tensor(name), out_dtype, base, report, check)
                yield name, tensor


def _merged_tensor(inputs: MergeInputs, name: str, tensor: torch.Tensor, out_dtype: torch.dtype | None, base: str,
                   report: MergeReport, check: bool) -> torch.Tensor:
    module, _, attr = name.rpartition(".")
    if not tensor.is_floating_point() or (out_dtype is None and (attr != "weight" or module not in inputs.quantized)):
        return tensor
    if attr != "weight" or module not in inputs.quantized:
        return _cast(tensor, out_dtype, name)
    pair = inputs.loras.get(module)
    merged, dequantized = _merged_weight(inputs, tensor, pair, base)
    merged = _cast(merged, out_dtype or torch.float32, name)
    if check and pair is not None:
        _check_layer(inputs, module, merged, dequantized, pair, base, report)
    return merged


def _merged_weight(inputs: MergeInputs, tensor: torch.Tensor, pair: tuple[torch.Tensor, torch.Tensor] | None,
                   base: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_base + scale * B @ A in fp32, the dequantized weight) for one 4-bit matrix and its LoRA pair (or None)."""
    original = tensor.to(inputs.compute_dtype)  # training cast to the compute dtype before quantizing
    dequantized = quantize_roundtrip(original, inputs.quant, inputs.quant_device).cpu()
    weight = (dequantized if base == "dequantized" else original).float()
    if pair is not None:
        a, b = (t.float() for t in pair)
        weight = weight + inputs.scale * (b @ a)
    return weight, dequantized


class ExpertMerge:
    """Merges MoE expert weights (experts.py), each expert's matrix as one 4-bit weight, written in the
    checkpoint's own layout: a fused (experts, out, in) tensor expert by expert; one tensor per expert and
    projection (`experts.3.w1.weight`) as it comes, except that gate and up were quantized together (one
    matrix per expert, as training did), so the first of the two reads its other half and the merged matrix
    waits for the second. The parity check covers every expert."""

    def __init__(self, inputs: MergeInputs, out_dtype: torch.dtype | None, base: str, report: MergeReport,
                 check: bool) -> None:
        self.inputs, self.out_dtype, self.base, self.report, self.check = inputs, out_dtype, base, report, check
        self.waiting: dict[tuple[str, int], torch.Tensor] = {}
        self.blocks = {name.rpartition(".")[0] for name in inputs.experts}
        self.files = _tensor_files(inputs.base_path) if inputs.experts else {}

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        """The merged tensor for `name`, or None for a tensor that is no expert's."""
        inputs = self.inputs
        slot = experts.checkpoint_slot(inputs.model_type, self.blocks, name)
        if slot is None:
            return None
        stack, e, half = slot
        if e is None:
            return torch.stack([self._merged(name, stack, i, w) for i, w in enumerate(tensor)])
        if half is None:
            return self._merged(name, stack, e, tensor)
        merged = self.waiting.pop((stack, e), None)
        if merged is None:
            other = _read_tensor(inputs.base_path, self.files, experts.other_half(inputs.model_type, name))
            merged = self._merged(name, stack, e, torch.cat([tensor, other] if half == 0 else [other, tensor]))
            self.waiting[(stack, e)] = merged
        rows = merged.shape[0] // 2
        return (merged[:rows] if half == 0 else merged[rows:]).contiguous()

    def _merged(self, name: str, stack: str, expert: int, tensor: torch.Tensor) -> torch.Tensor:
        pair = self.inputs.loras.get(stack)
        if pair is not None:
            pair = experts.expert_pair(*pair, expert, self.inputs.experts[stack][0])
        weight, dequantized = _merged_weight(self.inputs, tensor, pair, self.base)
        merged = _cast(weight, self.out_dtype or torch.float32, name)
        if self.check and pair is not None:
            _check_layer(self.inputs, stack, merged, dequantized, pair, self.base, self.report)
        return merged


def _cast(tensor: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    if dtype == torch.float16 and not within_fp16(tensor):
        raise UserError(f"'{name}' has values beyond float16's range (|w| > 65504, inf or nan); "
                        "export with --dtype bfloat16 instead")
    return tensor.to(dtype).contiguous()


def within_fp16(tensor: torch.Tensor) -> bool:
    """|w| <= 65504 and no inf or nan, without a tensor-sized temporary (NaN fails both comparisons)."""
    low, high = torch.aminmax(tensor)
    return bool(low >= -FP16_MAX) and bool(high <= FP16_MAX)


def _check_layer(inputs: MergeInputs, module: str, merged: torch.Tensor, dequantized: torch.Tensor,
                 pair: tuple[torch.Tensor, torch.Tensor], base: str, report: MergeReport) -> None:
    """`merged @ x` against `dequant(W4) @ x + lora(x)` on random inputs, relative to the largest output. An expert
    projection reports its worst expert."""
    a, b = (t.float() for t in pair)
    x = torch.randn(8, merged.shape[1], generator=torch.Generator().manual_seed(0))
    reference = x @ dequantized.float().T + inputs.scale * (x @ a.T) @ b.T
    ours = x @ merged.float().T
    error = ((ours - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()
    error = max(error, report.layers.get(module, 0.0))
    report.layers[module] = error
    if base == "original":
        report.quantization_error[module] = error  # what merging into weights the adapter never saw costs
        bad = not torch.isfinite(ours).all()
    else:
        bad = not error <= LAYER_TOLERANCE[merged.dtype]
    if bad:
        report.passed = False
        report.failures.append(f"{module}: relative error {error:.2e}")


def _check_logits(inputs: MergeInputs, out: Path, out_dtype: torch.dtype, report: MergeReport) -> None:
    """Exported model (plain transformers) against the adapter on the 4-bit base, on a few random sequences.

    Both sides compute in float32 (on the GPU when there is one): the 4-bit weights are quantized from the
    training compute dtype exactly as in training, so what is compared is the export's rounding alone, at the
    export dtype's tolerance; a bf16 reference would add its own rounding, and run ~50x slower on most CPUs."""
    device = default_device()
    trained = adapter_reference(inputs, device)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device).eval()
    ids = torch.randint(0, exported.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = trained.eval()(ids.to(device)).logits.float()
        ours = exported(ids.to(device)).logits.float()
    report.logits_max_abs_diff = (ours - reference).abs().max().item()
    report.logits_max_abs = reference.abs().max().item()
    if not report.logits_max_abs_diff <= LOGIT_TOLERANCE[out_dtype] * report.logits_max_abs:
        report.passed = False
        report.failures.append(f"logits differ by {report.logits_max_abs_diff:.2e} (max |logit| "
                               f"{report.logits_max_abs:.2f})")


def _tensor_files(path: Path) -> dict[str, str]:
    """Which shard holds each tensor of a checkpoint."""
    files = {}
    for file in checkpoint_files(path):
        with safe_open(path / file, framework="pt", device="cpu") as f:
            files.update(dict.fromkeys(f.keys(), file))
    return files


def _read_tensor(path: Path, files: dict[str, str], name: str) -> torch.Tensor:
    if name not in files:
        raise UserError(f"{path}: checkpoint has {name.rpartition('.')[0]}'s other half missing ({name})")
    with safe_open(path / files[name], framework="pt", device="cpu") as f:
        return f.get_tensor(name)


def adapter_reference(inputs: MergeInputs, device: torch.device) -> torch.nn.Module:
    """What an export must compute: the adapter on its 4-bit base, in float32, the 4-bit weights quantized from
    the training compute dtype as training quantized them (see `_check_logits`)."""
    return load_adapter_model(inputs.adapter_dir, device, "float32", str(inputs.base_path),
                              quantize_from=inputs.compute_dtype).model.eval()


def _checkpoint_bytes(path: Path) -> int:
    return sum((path / f).stat().st_size for f in checkpoint_files(path))


def _write_config_and_tokenizer(base_path: Path, out: Path, dtype: str) -> None:
    """Copy every non-weight file (tokenizer, chat template, generation config); config.json says the dtype."""
    for file in base_path.iterdir():
        if file.is_file() and not file.name.endswith((".safetensors", ".bin", ".pt", ".pth", ".index.json")):
            shutil.copy2(file, out / file.name)
    config = json.loads((base_path / "config.json").read_text())
    config.pop("quantization_config", None)
    config.pop("torch_dtype", None)
    config["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _export_bytes(base_path: Path, out_dtype: torch.dtype) -> int:
    """The export's size, from the base's tensor shapes (headers only), with 5% to spare."""
    needed = 0
    for file in checkpoint_files(base_path):
        with safe_open(base_path / file, framework="pt", device="cpu") as f:
            for name in f.keys():
                needed += math.prod(f.get_slice(name).get_shape()) * out_dtype.itemsize
    return int(needed * 1.05)
