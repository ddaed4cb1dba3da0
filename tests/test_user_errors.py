"""User mistakes end in one line and exit code 2 (`--debug` shows the traceback), whatever the input's size or shape.

Each case goes through the command line (in-process: `cli.main` returns the exit code) as a user would type it.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_kit.cli import main
from qlora_kit.config import MAX_YAML_VALUES
from qlora_kit.train import train

from conftest import make_tiny_model, write_jsonl

WORDS = ("alpha", "bravo", "delta", "tango")


def one_line_error(capsys, args: list[str], expected: str, code: int = 2) -> str:
    assert main([str(a) for a in args]) == code, args
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("qlora-kit")]
    assert len(lines) == 1 and lines[0].startswith("qlora-kit: "), lines
    assert expected in lines[0], lines[0]
    assert len(lines[0]) < 600  # one readable line, whatever the input
    return lines[0]


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Reverse: {w}\n", "completion": w[::-1]} for w in WORDS])


def recipe(tmp_path, text: str | bytes):
    path = tmp_path / "recipe.yaml"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


# ------------------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("text, expected", [
    ("train: {<<: {lr: 0.1}}\n", "recipe.yaml:1: YAML merge keys (<<) are not supported"),
    ("train:\n  lr: 0.1\ntrain:\n  epochs: 2\n", "recipe.yaml:3: 'train' is given twice (also on line 1)"),
    ("train:\n  lr: 0.1\n  lr: 0.2\n", "recipe.yaml:3: 'train.lr' is given twice"),
    ("1: 2\n", "recipe.yaml:1: recipe keys are names, got '1'"),
    (b"seed: 1\n# caf\xe9\n", "recipe.yaml:2: not UTF-8 text"),
    ("train: 5\n", "'train' is a section: give it keys"),
    ("seed: -1\n", "'seed' must be in [0, 2**32 - 1]"),
    ("seed: 99999999999\n", "'seed' must be in [0, 2**32 - 1]"),
    ("model:\n  path: [" + ", ".join(["a" * 50] * 200) + "]\n", "'model.path' must be a string, got ['aaaa"),
])
def test_recipe_mistakes(tmp_path, capsys, text, expected):
    one_line_error(capsys, ["train", recipe(tmp_path, text), "--dry-run"], expected)


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    value = "&v0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"
    for i in range(1, 9):  # 9^9 ~ 390 million values once expanded, from ~300 bytes
        value = f"&v{i} [" + ", ".join([value] + [f"*v{i - 1}"] * 8) + "]"
    start = time.perf_counter()
    one_line_error(capsys, ["train", recipe(tmp_path, f"model:\n  path: {value}\n"), "--dry-run"],
                   f"expands (aliases included) to more than {MAX_YAML_VALUES:,} values")
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("override, expected", [
    ("model.path=[", "the value of 'model.path' is not valid YAML"),
    ("seed=-1", "'seed' must be in"),
    ("train=5", "'train' is a section"),
])
def test_command_line_mistakes(tmp_path, capsys, override, expected):
    one_line_error(capsys, ["train", recipe(tmp_path, "seed: 1\n"), override, "--dry-run"], expected)


def test_a_rank_that_cannot_fit_in_memory_is_refused_before_allocating(tiny_llama, data, tmp_path, capsys):
    one_line_error(capsys, ["train", recipe(tmp_path, "seed: 1\n"), f"model.path={tiny_llama}", f"data.path={data}",
                            f"output_dir={tmp_path / 'run'}", "lora.r=1e9"], "'lora.r': 1000000000 needs")


@pytest.mark.parametrize("where", ["file", "unwritable"])
def test_an_output_dir_that_cannot_hold_a_run(tiny_llama, data, tmp_path, capsys, where):
    if where == "file":
        out = tmp_path / "taken"
        out.write_text("a file")
        expected = "exists and is not a directory"
    else:
        out = "/proc/qlora-kit-run"  # not writable by anyone, root included
        expected = "/proc"
    one_line_error(capsys, ["train", recipe(tmp_path, "seed: 1\n"), f"model.path={tiny_llama}", f"data.path={data}",
                            f"output_dir={out}"], expected)


# ------------------------------------------------------------------------------------------------ data


def test_a_chat_row_opened_by_the_assistant_is_a_bad_row_that_can_be_skipped(tiny_llama, tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "assistant", "content": "I start"}, {"role": "user", "content": "ok"},
                          {"role": "assistant", "content": "fine"}]}]
    chat = write_jsonl(tmp_path / "chat.jsonl", rows)
    args = ["train", recipe(tmp_path, "seed: 1\n"), f"model.path={tiny_llama}", f"data.path={chat}",
            f"output_dir={tmp_path / 'run'}", "train.max_steps=1"]
    one_line_error(capsys, args, f"{chat}:2: the first message is from the assistant")
    assert main([str(a) for a in args] + ["data.skip_bad_rows=true"]) == 0
    assert "1 bad rows skipped" in capsys.readouterr().err


def test_a_row_nested_100000_deep_is_a_bad_row(tiny_llama, tmp_path, capsys):
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n"
                    + '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "completion": "b"}\n')
    one_line_error(capsys, ["train", recipe(tmp_path, "seed: 1\n"), f"model.path={tiny_llama}", f"data.path={path}",
                            f"output_dir={tmp_path / 'run'}"], f"{path}:2: JSON nested too deeply to read")


@pytest.mark.slow
def test_ctrl_c_while_loading_data_exits_130_with_one_line(tiny_llama, tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Reverse: w{i}\n", "completion": f"{i}w"}) + "\n"
                            for i in range(300_000)))
    env = {**os.environ, "QLORA_KIT_CACHE": str(tmp_path / "cache")}
    run = subprocess.Popen([sys.executable, "-m", "qlora_kit", "train", str(recipe(tmp_path, "seed: 1\n")),
                            f"model.path={tiny_llama}", f"data.path={path}", f"output_dir={tmp_path / 'run'}"],
                           stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (tmp_path / "cache" / "datasets").exists():  # reading the rows has begun
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130
    assert [line for line in err.splitlines() if line.startswith("qlora-kit")] == ["qlora-kit: interrupted"]
    assert "Traceback" not in err and not (tmp_path / "run" / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------- adapters and models


@pytest.fixture(scope="module")
def adapter(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter")
    data = write_jsonl(root / "d.jsonl", [{"prompt": f"Reverse: {w}\n", "completion": w[::-1]} for w in WORDS])
    result = train(load_recipe_for(tiny_models["llama"], data, root / "run"))
    return result.adapter_dir, data


def load_recipe_for(model, data, out):
    from qlora_kit.config import load_recipe

    return load_recipe(None, [f"model.path={model}", f"data.path={data}", f"output_dir={out}", "train.max_steps=1",
                              "train.seq_len=64", "lora.r=4"])


def damaged(adapter_dir, tmp_path, how: str):
    out = tmp_path / "adapter"
    shutil.copytree(adapter_dir, out)
    weights_path, config_path = out / "adapter_model.safetensors", out / "adapter_config.json"
    weights, config = load_file(weights_path), json.loads(config_path.read_text())
    a_key = next(k for k in weights if "lora_A" in k)
    if how == "no weights file":
        weights_path.unlink()
    elif how == "broken JSON":
        config_path.write_text('{"r": 4, ')
    elif how == "no r":
        config.pop("r")
        config_path.write_text(json.dumps(config))
    elif how == "no lora_B":
        del weights[a_key.replace("lora_A", "lora_B")]
        save_file(weights, weights_path)
    elif how == "wrong A shape":
        weights[a_key] = torch.zeros(4, 3)
        save_file(weights, weights_path)
    elif how == "unknown layer":
        module = a_key.split(".lora_A")[0]
        for part in ("lora_A", "lora_B"):
            key = a_key.replace("lora_A", part)
            weights[key.replace(module, module.rsplit(".", 1)[0] + ".nope_proj")] = weights[key].clone()
        save_file(weights, weights_path)
    return out


@pytest.mark.parametrize("how, expected", [
    ("no weights file", "no adapter_model.safetensors here"), ("broken JSON", "adapter_config.json: not valid JSON"),
    ("no r", "'r' must be a positive integer, got None"), ("no lora_B", "has lora_A but no lora_B"),
    ("wrong A shape", "adapter's B @ A is"), ("unknown layer", "nope_proj, which is not a quantized linear layer")])
@pytest.mark.parametrize("command", ["eval", "generate", "train"])
def test_damaged_adapters(adapter, tmp_path, capsys, how, expected, command):
    broken = damaged(adapter[0], tmp_path, how)
    if command == "eval":
        args = ["eval", broken, "--data", adapter[1]]
    elif command == "generate":
        args = ["generate", broken, "--prompt", "hi", "--max-new-tokens", "2"]
    else:
        if how in ("unknown layer", "wrong A shape"):
            expected = "adapter"  # training first checks the adapter against the recipe's targets and rank
        args = ["train", recipe(tmp_path, "seed: 1\n"), *load_args(adapter, tmp_path), f"model.adapter={broken}"]
    one_line_error(capsys, args, expected)


def load_args(adapter, tmp_path):
    adapter_dir, data = adapter
    model = json.loads((adapter_dir / "qlora_kit.json").read_text())["model_path"]
    return [f"model.path={model}", f"data.path={data}", f"output_dir={tmp_path / 'run'}", "lora.r=4",
            "train.max_steps=1"]


def test_a_model_type_transformers_does_not_know(tmp_path, capsys, data):
    model = make_tiny_model(tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "not-a-real-architecture"
    (model / "config.json").write_text(json.dumps(config))
    one_line_error(capsys, ["eval", model, "--data", data], "transformers cannot build this model")
    one_line_error(capsys, ["train", recipe(tmp_path, "seed: 1\n"), f"model.path={model}", f"data.path={data}",
                            f"output_dir={tmp_path / 'run'}"], "transformers cannot build this model")


def test_a_pickle_only_model_directory_is_refused(tmp_path, capsys, data):
    model = make_tiny_model(tmp_path / "m")
    weights = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    torch.save(weights, model / "pytorch_model.bin")
    for command in (["eval", model, "--data", data], ["generate", model, "--prompt", "hi"]):
        one_line_error(capsys, command, "qlora-kit loads safetensors only")


def test_a_model_whose_loss_is_not_finite_fails_eval(tmp_path, capsys, data):
    model = make_tiny_model(tmp_path / "m")
    weights = load_file(model / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, model / "model.safetensors")
    one_line_error(capsys, ["eval", model, "--data", data, "--json"], "the loss is nan", code=1)


@pytest.mark.parametrize("args, expected", [
    (["eval", "x", "--data", "d", "--seq-len", "0"], "argument --seq-len: must be a positive integer, got '0'"),
    (["generate", "x", "--prompt", "p", "--max-new-tokens", "-1"], "argument --max-new-tokens: must be a positive"),
    (["train", "r.yaml", "--no-such-flag"], "unrecognized arguments: --no-such-flag")])
def test_command_line_flags(capsys, args, expected):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines


def test_eval_without_generation_says_it_skipped_exact_match(adapter, capsys):
    assert main(["eval", str(adapter[0]), "--data", str(adapter[1]), "--no-generate"]) == 0
    out = capsys.readouterr().out
    assert "skipped (--no-generate)" in out and "no answers" not in out
