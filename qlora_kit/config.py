"""Recipes: YAML mapped 1:1 onto nested typed dataclasses.

Every key a recipe may hold is a dataclass field below, with its unit and the reason for its default. Loading
is strict: an unknown key, a value of the wrong type or a value out of range is a `UserError` that names the
key and where it came from (``recipe.yaml:12`` or ``command line``), so a typo never silently trains the
wrong thing. The resolved recipe (defaults filled in, overrides applied) is saved next to every output.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qlora_kit.errors import UserError

OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw")
LR_SCHEDULES = ("cosine", "constant")
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
STORAGE_DTYPES = ("uint8", "bfloat16", "float16", "float32")
DATA_FORMATS = ("auto", "prompt_completion", "alpaca", "chat", "text")
PACKINGS = ("padding_free", "pack", "none")
TOO_LONG = ("truncate", "drop", "error")


@dataclass
class ModelConfig:
    # A local Hugging Face model directory, a built-in name (`tiny-random-llama`, `smollm2-135m`), or a hub
    # id when `allow_network` is on.
    path: str = "tiny-random-llama"
    # An adapter directory (PEFT format) to start from: continue training, or evaluate.
    adapter: str | None = None
    # Off by default: remote code runs arbitrary Python from the model repository.
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    # A .jsonl, .json, .csv or .parquet file, a folder of them, or a `datasets` hub name (with allow_network).
    path: str = ""
    # `auto` picks from the first row's columns: messages -> chat, instruction + output -> alpaca,
    # prompt + completion -> prompt_completion, text -> text (continued pretraining).
    format: str = "auto"
    # A Jinja chat template (or a file holding one) for `chat` data; null uses the model tokenizer's own, which is
    # what the model will be served with.
    chat_template: str | None = None
    # Where each field lives in your data, when its column has another name.
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"
    messages_column: str = "messages"
    text_column: str = "text"
    # Off: loss on completions / assistant turns only; training on prompts spends capacity on text the model is
    # given, not asked to write.
    train_on_prompt: bool = False
    # `padding_free`: a micro-batch's examples in one row, no padding, the same steps and losses as padded
    # batches. `pack`: rows of train.seq_len holding as many examples as fit (fewer, fuller steps: another
    # trajectory). `none`: padded batches of similar lengths.
    packing: str = "padding_free"
    # Examples longer than train.seq_len: `truncate` (the prompt first, from its start; then the end), `drop`,
    # or `error`. Truncating keeps every example, which is what most datasets with a few long rows want.
    too_long: str = "truncate"
    # A separate evaluation file (same format as data.path), or a fraction of data.path held out (seeded).
    eval_path: str | None = None
    eval_fraction: float = 0.0
    # Off: a bad row stops the run before training, naming its file:line. On: bad rows are left out and counted.
    skip_bad_rows: bool = False
    # Tokenising processes; 0 = one per 10,000 rows up to the CPU count (a process costs ~1 s to start).
    num_proc: int = 0


@dataclass
class TrainConfig:
    # Optimizer steps; 0 means "run `epochs` epochs". When set, it wins over `epochs`.
    max_steps: int = 0
    epochs: int = 1
    # Tokens per example; longer examples are truncated. Memory grows linearly with it (checkpointed).
    seq_len: int = 2048
    # Examples per forward pass. Higher is faster until memory runs out.
    micro_batch_size: int = 4
    # Micro-batches per optimizer step: effective batch = micro_batch_size * grad_accum * processes.
    grad_accum: int = 1
    # 2e-4 is the QLoRA paper's learning rate for 7B-13B models.
    lr: float = 2e-4
    lr_schedule: str = "cosine"
    # Linear warmup, in optimizer steps; protects freshly initialised LoRA matrices from large first updates.
    warmup_steps: int = 0
    # The cosine schedule decays to lr * min_lr_ratio.
    min_lr_ratio: float = 0.0
    # Clip the global gradient norm to this value (0 disables); the QLoRA paper uses 0.3.
    max_grad_norm: float = 1.0
    # Recompute activations in the backward pass: ~30% slower, activation memory from O(layers) to O(1).
    gradient_checkpointing: bool = True
    # Keep the decoder layers' 4-bit weights in CPU memory and copy each layer to the GPU as it runs (prefetched
    # on a side stream): GPU memory for weights drops to ~2 layers, for copy time. Needs gradient checkpointing.
    offload_base: bool = False
    # Log every N optimizer steps to metrics.jsonl.
    log_every: int = 1
    # Evaluation loss every N optimizer steps (0 = only at the end); needs data.eval_path or data.eval_fraction.
    eval_every: int = 0
    # Merge the adapter into its base at the end (`output_dir/merged`, checked; see `qlora-kit merge`).
    merge_after: bool = False
    # float16 loads everywhere; bfloat16 when weights exceed float16's range (the merge says so).
    merge_dtype: str = "float16"
    # Checkpoint (adapter, optimizer, schedule, RNG, data position) every N optimizer steps, and always at the end;
    # 0 = only at the end. Resume with `--resume`. Each costs ~3x the adapter's fp32 size on disk.
    save_every: int = 0
    # Checkpoints kept in output_dir/checkpoints (the newest); 2 so one survives a save that fails midway.
    keep_checkpoints: int = 2
    # Steps in a row with a non-finite loss or gradient norm that are skipped before the run stops as diverged.
    max_bad_steps: int = 3
    # Warn when a step's loss exceeds this multiple of the running average (0 disables); 5x is far beyond noise.
    spike_factor: float = 5.0


@dataclass
class LoraConfig:
    # Rank of the update B @ A. Higher increases capacity and memory (linearly).
    r: int = 16
    # The update is scaled by alpha / r (alpha / sqrt(r) with rslora); alpha = 2r is the common choice.
    alpha: float = 32.0
    dropout: float = 0.05
    # `all-linear` (every quantized linear, the QLoRA paper's advice; in MoE models every expert too, one pair per
    # expert) or a list of names / regexes (`experts` names an MoE block's experts).
    target_modules: str | list[str] = "all-linear"
    # Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023): keeps the update size stable as r grows.
    use_rslora: bool = False


@dataclass
class OptimConfig:
    # Paged optimizers move their state to CPU memory under GPU memory pressure instead of failing.
    name: str = "paged_adamw_32bit"
    # Applied to the LoRA matrices only (they are the only trainable tensors).
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


@dataclass
class QuantConfig:
    # NF4 is information-theoretically optimal for normally distributed weights (QLoRA paper).
    quant_type: str = "nf4"
    # Quantize the per-block scales too: saves ~0.37 bits per parameter (~3 GB on a 65B model).
    double_quant: bool = True
    # `auto`: bfloat16 on a GPU that has it, float16 on older GPUs, float32 on CPU (bf16 matmuls are ~50x
    # slower than fp32 on a CPU without bf16 units).
    compute_dtype: str = "auto"
    # Weights per quantization block; 64 is bitsandbytes' and the QLoRA paper's default.
    blocksize: int = 64
    # dtype the packed 4-bit bytes are stored in; FSDP needs it equal to the sharded parameters' dtype.
    storage_dtype: str = "uint8"


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    output_dir: str = "runs/qlora"
    seed: int = 42
    # Off by default: no download of weights or data unless the user allows it.
    allow_network: bool = False


# --------------------------------------------------------------------------------------------- loading


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Read a recipe file (or start from defaults when `path` is None) and apply `key=value` overrides."""
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    if path is not None:
        values, where = _read_yaml(Path(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"command line: override {short(item)} is not of the form key=value (e.g. train.lr=1e-4)")
        values[key.strip()] = _parse_value(raw, key.strip()) if raw.strip() else ""
        where[key.strip()] = "command line"
    recipe = Recipe()
    for key, value in values.items():
        _set(recipe, key, value, where.get(key, "recipe"))
    validate(recipe, where)
    return recipe


def _parse_value(raw: str, key: str) -> Any:
    """A command-line value, read as YAML (`1e-4`, `[q_proj, v_proj]`, `true`)."""
    try:
        node = yaml.compose(raw)
    except yaml.YAMLError as e:
        raise UserError(f"command line: the value of '{key}' is not valid YAML ({getattr(e, 'problem', e)}); "
                        "quote it if it is text") from None
    _check_size(node, "command line")
    return yaml.safe_load(raw)


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Flatten a YAML file into dotted keys, remembering `file:line` of each for error messages."""
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text") from None
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if root is None:
        return {}, {}
    if not isinstance(root, yaml.MappingNode):
        raise UserError(f"{path}:1: a recipe must be a mapping of keys to values")
    _check_size(root, str(path))
    values: dict[str, Any] = {}
    where: dict[str, str] = {}

    def walk(node: yaml.MappingNode, prefix: str) -> None:
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise UserError(f"{path}:{line}: YAML merge keys (<<) are not supported in recipes; write the keys "
                                "out")
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                raise UserError(f"{path}:{line}: recipe keys are names, got {short(key_node.value)}")
            key = f"{prefix}{key_node.value}"
            if key_node.value in seen:
                raise UserError(f"{path}:{line}: '{key}' is given twice (also on line {seen[key_node.value]})")
            seen[key_node.value] = line
            if isinstance(value_node, yaml.MappingNode) and _is_section(key):
                walk(value_node, key + ".")
            else:
                values[key] = _construct(value_node, path)
                where[key] = f"{path}:{line}"

    walk(root, "")
    return values, where


def _construct(node: yaml.Node, path: Path) -> Any:
    """A composed YAML node's value, with safe_load's rules (tags, types)."""
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError as e:
        raise UserError(f"{path}:{node.start_mark.line + 1}: invalid YAML: {getattr(e, 'problem', e)}") from None


# Aliases (*name) make YAML a graph: a few hundred bytes can describe billions of values once expanded.
MAX_YAML_VALUES = 10_000


def _check_size(root: yaml.Node, where: str) -> None:
    """Refuse a document whose values, with every alias expanded, number more than MAX_YAML_VALUES."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) not in sizes:
            sizes[id(node)] = 0  # a node that refers to itself counts once
            children = (node.value if isinstance(node, yaml.SequenceNode) else
                        [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
            sizes[id(node)] = min(1 + sum(size(child) for child in children), MAX_YAML_VALUES + 1)
        return sizes[id(node)]

    if size(root) > MAX_YAML_VALUES:
        raise UserError(f"{where}: the YAML expands (aliases included) to more than {MAX_YAML_VALUES:,} values; a "
                        "recipe needs far fewer")


def short(value: Any, limit: int = 80) -> str:
    """repr(value), cut to about `limit` characters: error messages stay one readable line whatever the input."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 60, 60, 2, 4, 4


def _is_section(key: str) -> bool:
    return any(f.name == key and dataclasses.is_dataclass(f.default_factory) for f in dataclasses.fields(Recipe)
               if f.default_factory is not dataclasses.MISSING)


def valid_section_key(section: str) -> str:
    return next(k for k in valid_keys() if k.startswith(section + ".")).partition(".")[2]


def valid_keys() -> list[str]:
    """Every dotted key a recipe may hold, e.g. `train.lr`."""
    keys = []
    for f in dataclasses.fields(Recipe):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(f.default_factory)]
        else:
            keys.append(f.name)
    return keys


# Names other tools use for our keys, so "did you mean" finds them although they look nothing alike.
_ALIASES = {"learning_rate": "lr", "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
            "batch_size": "micro_batch_size", "per_device_train_batch_size": "micro_batch_size",
            "gradient_accumulation_steps": "grad_accum", "num_train_epochs": "epochs", "max_seq_length": "seq_len",
            "max_length": "seq_len", "model_name_or_path": "path", "optimizer": "name", "bnb_4bit_quant_type":
            "quant_type", "bnb_4bit_use_double_quant": "double_quant", "bnb_4bit_compute_dtype": "compute_dtype"}


def closest_key(key: str) -> str | None:
    section, _, leaf = key.rpartition(".")
    keys = valid_keys()
    alias = [k for k in keys if k.rpartition(".")[2] == _ALIASES.get(leaf) and k.startswith(section)]
    close = alias or difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    return close[0] if close else None


def _set(recipe: Recipe, key: str, value: Any, where: str) -> None:
    if _is_section(key):
        raise UserError(f"{where}: '{key}' is a section: give it keys, e.g. {key}: {{{valid_section_key(key)}: ...}}")
    if key not in valid_keys():
        close = closest_key(key)
        hint = f"; did you mean '{close}'?" if close else f"; valid keys: {', '.join(valid_keys())}"
        raise UserError(f"{where}: unknown recipe key '{key}'{hint}")
    *parents, name = key.split(".")
    obj = recipe
    for p in parents:
        obj = getattr(obj, p)
    hint = typing.get_type_hints(type(obj))[name]
    value = _coerce(value, hint, key, where)
    if key == "lora.target_modules" and isinstance(value, str) and value != "all-linear":
        value = [v.strip() for v in value.split(",") if v.strip()]  # `q_proj,v_proj` on the command line
    setattr(obj, name, value)


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    """Convert a YAML or command-line value to the field's type (PyYAML reads `1e-4` as a string)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except UserError:
                pass
        raise UserError(f"{where}: '{key}' must be {_type_name(hint)}, got {short(value)}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise UserError(f"{where}: '{key}' must be a list, got {short(value)}")
        return [_coerce(v, item, key, where) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
    elif hint is int:
        number = _number(value)
        if number is not None and float(number).is_integer():
            return int(number)
    elif hint is float:
        number = _number(value)
        if number is not None and math.isfinite(number):
            return float(number)
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise UserError(f"{where}: '{key}' must be {_type_name(hint)}, got {short(value)}")


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return "a list"
    return names.get(hint, str(hint))


# ------------------------------------------------------------------------------------------ validation


def validate(recipe: Recipe, where: dict[str, str] | None = None) -> None:
    """Check value ranges; each failure names the key and where it was set."""
    where = where or {}
    t, lora, q = recipe.train, recipe.lora, recipe.quant

    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise UserError(f"{where.get(key, 'recipe')}: '{key}' {message}")

    check(lora.r > 0, "lora.r", f"must be a positive integer, got {lora.r}")
    check(lora.alpha > 0, "lora.alpha", f"must be positive, got {lora.alpha}")
    check(0 <= lora.dropout < 1, "lora.dropout", f"must be in [0, 1), got {lora.dropout}")
    targets = lora.target_modules
    check(targets == "all-linear" or (isinstance(targets, list) and len(targets) > 0), "lora.target_modules",
          f"must be 'all-linear' or a non-empty list of module names or regexes, got {targets!r}")
    check(recipe.optim.name in OPTIMIZERS, "optim.name",
          f"must be one of {', '.join(OPTIMIZERS)}, got {recipe.optim.name!r}")
    check(recipe.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    check(0 <= recipe.optim.beta1 < 1, "optim.beta1", "must be in [0, 1)")
    check(0 <= recipe.optim.beta2 < 1, "optim.beta2", "must be in [0, 1)")
    check(recipe.optim.eps > 0, "optim.eps", "must be positive")
    check(t.max_steps >= 0, "train.max_steps", f"must be >= 0 (0 = run train.epochs), got {t.max_steps}")
    check(t.epochs > 0, "train.epochs", f"must be a positive integer, got {t.epochs}")
    check(t.seq_len > 1, "train.seq_len", f"must be at least 2 tokens, got {t.seq_len}")
    check(t.micro_batch_size > 0, "train.micro_batch_size", f"must be positive, got {t.micro_batch_size}")
    check(t.grad_accum > 0, "train.grad_accum", f"must be positive, got {t.grad_accum}")
    check(t.lr > 0, "train.lr", f"must be positive, got {t.lr}")
    check(t.lr_schedule in LR_SCHEDULES, "train.lr_schedule",
          f"must be one of {', '.join(LR_SCHEDULES)}, got {t.lr_schedule!r}")
    check(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
    check(t.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 disables clipping)")
    check(t.log_every > 0, "train.log_every", "must be positive")
    check(not t.offload_base or t.gradient_checkpointing, "train.offload_base",
          "needs train.gradient_checkpointing: true (without it every layer's weights are kept for backward)")
    check(t.merge_dtype in ("float16", "bfloat16", "float32"), "train.merge_dtype",
          f"must be float16, bfloat16 or float32, got {t.merge_dtype!r}")
    check(t.save_every >= 0, "train.save_every", f"must be >= 0 (0 = only at the end), got {t.save_every}")
    check(t.keep_checkpoints > 0, "train.keep_checkpoints", f"must be at least 1, got {t.keep_checkpoints}")
    check(t.max_bad_steps >= 0, "train.max_bad_steps", f"must be >= 0, got {t.max_bad_steps}")
    check(t.spike_factor >= 0, "train.spike_factor", f"must be >= 0 (0 disables), got {t.spike_factor}")
    check(q.quant_type in QUANT_TYPES, "quant.quant_type",
          f"must be one of {', '.join(QUANT_TYPES)}, got {q.quant_type!r}")
    check(q.compute_dtype in COMPUTE_DTYPES, "quant.compute_dtype",
          f"must be one of {', '.join(COMPUTE_DTYPES)}, got {q.compute_dtype!r}")
    check(q.blocksize in (64, 128, 256, 512, 1024, 2048, 4096), "quant.blocksize",
          f"must be a power of two from 64 to 4096, got {q.blocksize}")
    check(q.storage_dtype in STORAGE_DTYPES, "quant.storage_dtype",
          f"must be one of {', '.join(STORAGE_DTYPES)}, got {q.storage_dtype!r}")
    check(bool(recipe.model.path), "model.path", "must be set")
    check(0 <= recipe.seed < 2**32, "seed", f"must be in [0, 2**32 - 1] (numpy's range), got {recipe.seed}")
    validate_data(recipe.data, check)
    check(t.eval_every >= 0, "train.eval_every", f"must be >= 0 (0 = evaluate at the end only), got {t.eval_every}")
    check(not t.eval_every or bool(recipe.data.eval_path or recipe.data.eval_fraction), "train.eval_every",
          "needs evaluation data: set data.eval_path or data.eval_fraction")
    check(bool(recipe.output_dir), "output_dir", "must be set")


def validate_data(d: DataConfig, check: Callable[[bool, str, str], None]) -> None:
    check(d.format in DATA_FORMATS, "data.format", f"must be one of {', '.join(DATA_FORMATS)}, got {d.format!r}")
    check(d.packing in PACKINGS, "data.packing", f"must be one of {', '.join(PACKINGS)}, got {d.packing!r}")
    check(d.too_long in TOO_LONG, "data.too_long", f"must be one of {', '.join(TOO_LONG)}, got {d.too_long!r}")
    check(0 <= d.eval_fraction < 1, "data.eval_fraction", f"must be in [0, 1), got {d.eval_fraction}")
    check(not (d.eval_path and d.eval_fraction), "data.eval_fraction",
          "cannot be set together with data.eval_path: choose one source of evaluation data")
    check(d.num_proc >= 0, "data.num_proc", f"must be >= 0 (0 = automatic), got {d.num_proc}")
    for key in ("prompt", "completion", "instruction", "input", "output", "messages", "text"):
        check(bool(getattr(d, f"{key}_column")), f"data.{key}_column", "must be a column name, not empty")


def to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def save_recipe(recipe: Recipe, path: Path) -> None:
    """Write the resolved recipe; it loads back into an identical `Recipe`."""
    path.write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
