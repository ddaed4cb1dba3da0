"""Export an adapter (merged on the fly) or a model directory to one GGUF file for llama.cpp, Ollama, LM Studio.

Streaming, in two passes over the checkpoint. The first reads only safetensors headers and the config: every
output tensor's GGUF name, shape and type, so the GGUF header (which lists them all, with offsets) is written
first. The second merges one tensor at a time (`merge.merged_tensors`: the same arithmetic as `qlora-kit
merge`, into the dequantized 4-bit base by default), converts it and appends it. Peak host memory is one input
shard's pages plus one tensor in float32 and its GGUF bytes, whatever the model size.

Tensor types follow llama.cpp's converter: 1-D tensors (norms, biases) stay float32; matrices get the chosen
type, or f16 where a row is not a whole number of 32-value blocks. q4_0 keeps the output projection (and tied
embeddings, which are the output projection too) in q8_0: the logits are where 4 bits hurt most, and
llama.cpp's own quantizer spares that tensor as well. Quantized types are computed from the float32 merged
weight, so the export rounds once.

The file is written under a hidden temporary name, checked (`gguf_check`), and renamed into place with its
report: a file at OUT is complete and checked.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from qlora_kit.cpu import return_large_frees_to_os
from qlora_kit.errors import Failed, UserError
from qlora_kit.files import check_free_space, exclusive, publish_file, remove_leftovers
from qlora_kit.gguf_check import check_export, written_digest
from qlora_kit.gguf_vocab import add_tokenizer
from qlora_kit.memory import peak_memory_bytes
from qlora_kit.merge import (
    LOGIT_CHECK_MAX_BYTES,
    MergeInputs,
    MergeReport,
    merged_tensors,
    read_merge_inputs,
    within_fp16,
)
from qlora_kit.model import checkpoint_files, load_config, load_tokenizer

TYPES = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
         "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
F32, F16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16


@dataclass(frozen=True)
class Arch:
    gguf_arch: gguf.MODEL_ARCH
    # llama.cpp's LLAMA graph rotates interleaved pairs of q/k dimensions; HF checkpoints store the two halves
    # apart, so q and k rows are permuted on the way (and back by every GGUF reader).
    permute_qk: bool


ARCHS = {"llama": Arch(gguf.MODEL_ARCH.LLAMA, True), "mistral": Arch(gguf.MODEL_ARCH.LLAMA, True),
         "qwen2": Arch(gguf.MODEL_ARCH.QWEN2, False), "phi3": Arch(gguf.MODEL_ARCH.PHI3, False)}
CHUNK_BYTES = 16 * 2**20  # convert this much float32 at a time (see _convert)


@dataclass
class Planned:
    source: str | None  # checkpoint tensor name; None for tensors made from the config (rope factors)
    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    permute_heads: int = 0
    data: torch.Tensor | None = None  # the tensors made from the config

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape[:-1]) * self.shape[-1] // block * size


@dataclass
class ExportReport:
    type: str
    source: str
    tensors: dict[str, float] = field(default_factory=dict)  # max |gguf - merged| / max |merged| per tensor
    merge_layers: dict[str, float] = field(default_factory=dict)
    checks: dict = field(default_factory=dict)
    seconds: float = 0.0
    peak_mem_bytes: int = 0
    bytes: int = 0
    passed: bool = True
    failures: list[str] = field(default_factory=list)


def export_gguf(source: Path, out: Path, qtype: str = "q8_0", model_path: str | None = None,
                base: str = "dequantized", overwrite: bool = False, check: bool = True,
                logit_check_max_bytes: int = LOGIT_CHECK_MAX_BYTES) -> ExportReport:
    """Write `source` (an adapter directory, merged first, or a model directory) to the GGUF file `out`.
    Everything that can be refused (arguments, architecture, tensors, tokenizer) is refused before a byte is
    written."""
    start = time.perf_counter()
    return_large_frees_to_os()
    source, out = Path(source), Path(out)
    if qtype not in TYPES:
        raise UserError(f"--type: {qtype!r} is not one of {', '.join(TYPES)}")
    if out.suffix != ".gguf":
        raise UserError(f"--gguf: {out} should end in .gguf")
    if out.exists() and not overwrite:
        raise UserError(f"--gguf: {out} already exists; pass --overwrite to replace it")
    inputs, model_dir = _read_source(source, out, model_path)
    config = load_config(model_dir)
    arch = ARCHS.get(config.model_type)
    if arch is None:
        raise UserError(f"{model_dir}: GGUF export supports {', '.join(sorted(ARCHS))} models, not "
                        f"{config.model_type!r}")
    tokenizer = load_tokenizer(model_dir)
    plan = plan_tensors(model_dir, config, arch, qtype)
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch.gguf_arch])
    _add_metadata(writer, config, model_dir, source, qtype)
    add_tokenizer(writer, tokenizer, model_dir, config.vocab_size)
    report = ExportReport(type=qtype, source=str(source), bytes=sum(p.nbytes for p in plan))
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(out, "--gguf"):
        remove_leftovers(out)
        check_free_space(out.parent, int(report.bytes * 1.05) + 2**20, "the GGUF export")
        fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.tmp-", suffix=".gguf")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            digests = _write(writer, tmp, plan, inputs, model_dir, base, check, report)
            if check:
                check_export(tmp, plan, digests, report, inputs, model_dir, tokenizer, logit_check_max_bytes)
            report.seconds = time.perf_counter() - start
            report.peak_mem_bytes = peak_memory_bytes(torch.device("cpu"))
            text = json.dumps(report.__dict__, indent=2) + "\n"
            if not report.passed:
                rejected = out.with_name(out.name + ".rejected")
                tmp.rename(rejected)
                rejected.with_name(rejected.name + ".report.json").write_text(text)
                raise Failed(f"GGUF parity check failed ({'; '.join(report.failures[:3])}); the rejected file and "
                             f"its report are {rejected} and {rejected}.report.json")
            _publish(tmp, out, text, out.with_name(out.name + ".report.json"))
        finally:
            tmp.unlink(missing_ok=True)
    return report


def _read_source(source: Path, out: Path, model_path: str | None) -> tuple[MergeInputs | None, Path]:
    """The merge inputs (for an adapter) and the model directory whose config, tokenizer and shapes are used."""
    from qlora_kit.inference import is_adapter_dir

    if is_adapter_dir(source):
        inputs = read_merge_inputs(source, model_path)
        for path in (inputs.base_path, inputs.adapter_dir):
            if path.resolve() in out.resolve().parents:
                raise UserError(f"--gguf: {out} lies inside {path}; choose another place")
        return inputs, inputs.base_path
    if (source / "config.json").is_file():
        return None, source
    raise UserError(f"{source}: neither an adapter directory (adapter_config.json) nor a model directory "
                    "(config.json)")


def _write(writer: gguf.GGUFWriter, path: Path, plan: list[Planned], inputs: MergeInputs | None, model_dir: Path,
           base: str, check: bool, report: ExportReport) -> dict[str, str]:
    """Header, metadata and tensor table, then each tensor as it is merged and converted; returns the sha256 of
    each tensor's bytes, for the read-back check."""
    for p in plan:
        writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    # Merged weights come in float32 and every other tensor as stored (an embedding in float32 would double the
    # largest tensor); each is rounded once, by the conversion, which also measures what that rounding cost.
    merge_report = MergeReport(dtype="float32", base=base)
    tensors = (merged_tensors(inputs, None, base, merge_report, check) if inputs is not None
               else _model_tensors(model_dir))
    digests = {}
    for p, data in _aligned(plan, tensors):
        data = _prepare(p, data)
        written, report.tensors[p.name] = _convert(data, p.qtype, p.name)
        digests[p.name] = written_digest(written)
        writer.write_tensor_data(written)
        del data, written
    writer.close()
    report.merge_layers = merge_report.layers
    if not merge_report.passed:
        report.passed = False
        report.failures += merge_report.failures
    return digests


def plan_tensors(model_dir: Path, config, arch: Arch, qtype: str) -> list[Planned]:
    """Every output tensor, in the order the second pass produces them (headers only: no weights are read)."""
    tensor_map = gguf.get_tensor_name_map(arch.gguf_arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    plan = []
    for file in checkpoint_files(model_dir):
        with safe_open(model_dir / file, framework="pt", device="cpu") as f:
            for source in f.keys():
                shape = tuple(f.get_slice(source).get_shape())
                if source.endswith("rotary_emb.inv_freq") or (tied and source == "lm_head.weight"):
                    plan.append(Planned(source, "", shape, F32))  # read and dropped: kept for pass alignment
                    continue
                name = tensor_map.get_name(source, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise UserError(f"{model_dir}/{file}: tensor {source!r} has no GGUF name for "
                                    f"{config.model_type}; this checkpoint holds more than the architecture")
                permute = 0
                if arch.permute_qk and source.endswith(("q_proj.weight", "q_proj.bias")):
                    permute = heads
                elif arch.permute_qk and source.endswith(("k_proj.weight", "k_proj.bias")):
                    permute = kv_heads
                plan.append(Planned(source, name, shape, _tensor_type(name, shape, qtype, tied), permute))
    for name, data in _rope_tensors(config, arch):
        plan.append(Planned(None, name, tuple(data.shape), F32, data=data))
    return plan


def _tensor_type(name: str, shape: tuple[int, ...], qtype: str, tied: bool) -> gguf.GGMLQuantizationType:
    if len(shape) < 2:
        return F32
    wanted = TYPES[qtype]
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    if qtype == "q4_0" and is_output:
        wanted = gguf.GGMLQuantizationType.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block == 0 else F16


def _aligned(plan: list[Planned],
             tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[Planned, torch.Tensor]]:
    """Pair each planned tensor with its data; the checkpoint's own tensors come in plan order."""
    stream = iter(tensors)
    for p in plan:
        if p.source is None:
            yield p, p.data
            continue
        source, data = next(stream)
        if source != p.source:
            raise RuntimeError(f"GGUF export: expected {p.source}, got {source}")
        if p.name:
            yield p, data


def _model_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in checkpoint_files(model_dir):
        with safe_open(model_dir / file, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _prepare(p: Planned, data: torch.Tensor) -> torch.Tensor:
    if p.qtype == F32:
        data = data.float()
    if p.permute_heads:
        n = p.permute_heads
        data = data.reshape(n, 2, data.shape[0] // n // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
    return data.contiguous()


def _convert(data: torch.Tensor, qtype: gguf.GGMLQuantizationType, name: str) -> tuple[np.ndarray, float]:
    """The tensor's GGUF bytes, and what the type's rounding cost it: max |converted - input| / max |input|.

    Row chunk by row chunk into one preallocated array, so that numpy's temporaries (several per chunk, in
    float32) stay a few tens of MiB whatever the tensor's size."""
    if qtype == F16 and not within_fp16(data):
        raise UserError(f"'{name}' has values beyond float16's range (|w| > 65504, inf or nan); export with "
                        "--type bf16 instead")
    rows = data.reshape(-1, data.shape[-1])
    out_row = gguf.quants.quant_shape_to_byte_shape(rows.shape, qtype)[-1]
    out = np.empty((rows.shape[0], out_row), dtype=np.uint8)
    step = max(1, CHUNK_BYTES // (rows.shape[1] * 4))
    worst, largest = 0.0, 0.0
    for i in range(0, rows.shape[0], step):
        chunk = rows[i:i + step].float()
        packed, back = _convert_rows(chunk, qtype)
        out[i:i + step] = packed.view(np.uint8).reshape(len(chunk), out_row)
        worst = max(worst, (back - chunk).abs().max().item())
        largest = max(largest, chunk.abs().max().item())
    error = worst / max(largest, 1e-30)
    shape = (*data.shape[:-1], out_row)
    return (out.view(np.float32 if qtype == F32 else np.float16).reshape(data.shape)
            if qtype in (F32, F16) else out.reshape(shape)), error


def _convert_rows(rows: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, torch.Tensor]:
    """float32 rows as GGUF data, and the values a reader gets back from it."""
    if qtype == F32:
        return rows.numpy(), rows
    if qtype == F16:
        half = rows.half()
        return half.numpy(), half.float()
    if qtype == gguf.GGMLQuantizationType.BF16:
        brain = rows.to(torch.bfloat16)
        return brain.view(torch.int16).numpy(), brain.float()
    packed = gguf.quants.quantize(rows.numpy(), qtype)
    return packed, torch.from_numpy(gguf.quants.dequantize(packed, qtype)).reshape(rows.shape)


def _rope_tensors(config, arch: Arch) -> list[tuple[str, torch.Tensor]]:
    """Rope scaling that llama.cpp reads as tensors: Llama 3's per-frequency factors, Phi-3's long/short ones."""
    rope = _rope_parameters(config)
    kind = rope.get("rope_type", "default")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if kind == "llama3":
        base = rope["rope_theta"]
        freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        factor, old = rope.get("factor", 8.0), rope.get("original_max_position_embeddings", 8192)
        low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
        wavelen = 2 * math.pi / freqs
        smooth = (old / wavelen - low) / (high - low)
        factors = torch.where(wavelen < old / high, torch.ones_like(freqs),
                              torch.where(wavelen > old / low, torch.full_like(freqs, factor),
                                          1 / ((1 - smooth) / factor + smooth)))
        return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors)]
    if kind == "longrope" and arch.gguf_arch == gguf.MODEL_ARCH.PHI3:
        return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight",
                 torch.tensor(rope["long_factor"], dtype=torch.float32)),
                (gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight",
                 torch.tensor(rope["short_factor"], dtype=torch.float32))]
    return []


def _rope_parameters(config) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return rope


def _add_metadata(writer: gguf.GGUFWriter, config, model_dir: Path, source: Path, qtype: str) -> None:
    """What llama.cpp reads to build the model graph: sizes, norms, rope (with its scaling) and the file type."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(source.resolve().parent.name if source.name == "adapter" else source.resolve().name)
    writer.add_file_type(FILE_TYPES[qtype])
    if qtype in ("q8_0", "q4_0"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = _rope_parameters(config)
    rotary = int(head_dim * rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
    writer.add_rope_dimension_count(rotary)
    writer.add_rope_freq_base(rope["rope_theta"])
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif kind == "longrope" and config.model_type == "phi3":
        original = rope.get("original_max_position_embeddings", config.original_max_position_embeddings)
        scale = config.max_position_embeddings / original
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
    elif kind not in ("default", "llama3"):
        raise UserError(f"{model_dir}/config.json: rope_type {kind!r} is not supported by GGUF export")
    if config.model_type == "phi3":
        if kind != "longrope" and getattr(config, "original_max_position_embeddings", None):
            writer.add_rope_scaling_orig_ctx_len(config.original_max_position_embeddings)
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)


def _publish(tmp: Path, out: Path, report_text: str, report_path: Path) -> None:
    """Report first, then the file: an OUT that exists is complete and its report is beside it."""
    staged = report_path.with_name(f".{report_path.name}.tmp")
    staged.write_text(report_text)
    publish_file(staged, report_path)
    publish_file(tmp, out)
