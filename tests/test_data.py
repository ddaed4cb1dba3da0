"""The data pipeline: formats and their loss masks, chat templates, truncation, packing equivalence, bad data.

The byte-level test tokenizer maps each ASCII character to one token, so expected token counts are string lengths.
"""

import csv
import json
import math
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoModelForCausalLM

from qlora_kit import attention
from qlora_kit.attention import SEGMENTS, needs_block_mask, per_example_sdpa, segment_sdpa, use_segment_attention
from qlora_kit.batching import (
    LengthGroupedBatches,
    block_causal_mask,
    collate,
    collate_padding_free,
    collate_rows,
    forward_inputs,
    pack_rows,
)
from qlora_kit.config import DataConfig, load_recipe
from qlora_kit.data import load_data, load_examples
from qlora_kit.errors import UserError
from qlora_kit.formats import IGNORE, MAX_CHARS_PER_TOKEN, Encoded, EncodingRules, encode_row, fit_to_length
from qlora_kit.loss import token_loss_sum
from qlora_kit.model_paths import byte_level_tokenizer
from qlora_kit.train import build_model, train

from conftest import own_lines, write_jsonl

TOK = byte_level_tokenizer()
EOS = "<|im_end|>"  # the test tokenizer's EOS; its pad token is <|endoftext|>
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"}]
# The test tokenizer's ChatML template with {% generation %} around what the model writes: transformers' own
# assistant mask from it is the reference for our incremental rendering. (Chat templates drop a newline right
# after a block tag, hence {{ '\n' }}.)
CHATML_TAGGED = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
                 "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}"
                 "<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def load(path, tmp_path, seq_len=256, tokenizer=TOK, **data):
    return load_examples(path, tokenizer, seq_len, DataConfig(path=str(path), **data), cache_dir=tmp_path / "cache")


def trained_text(example) -> str:
    """The text of the tokens that carry a label (labels equal the input ids where they are trained)."""
    return TOK.decode([label for label in example["labels"] if label != IGNORE])


# ---------------------------------------------------------------------------------------- formats and masks


def test_prompt_completion_trains_on_the_completion_and_eos(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Reverse: abc\n", "completion": "cba"}])
    (e,) = load(path, tmp_path).dataset
    assert TOK.decode(e["input_ids"]) == "Reverse: abc\ncba" + EOS
    assert e["labels"][:13] == [IGNORE] * 13 and trained_text(e) == "cba" + EOS


def test_alpaca_uses_the_stanford_prompts(tmp_path):
    rows = [{"instruction": "Add.", "input": "2 and 3", "output": "5"}, {"instruction": "Say hi.", "output": "hi"}]
    with_input, without = load(write_jsonl(tmp_path / "d.jsonl", rows), tmp_path).dataset
    assert TOK.decode(with_input["input_ids"]) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n"
        "### Response:\n5" + EOS)
    assert TOK.decode(without["input_ids"]) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSay hi.\n\n### Response:\nhi" + EOS)
    assert trained_text(with_input) == "5" + EOS and trained_text(without) == "hi" + EOS


def test_text_trains_on_every_token(tmp_path):
    (e,) = load(write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}]), tmp_path).dataset
    assert TOK.decode(e["input_ids"]) == "hello world" + EOS and e["labels"] == e["input_ids"]


def test_chat_uses_the_model_template_and_trains_on_assistant_turns(tmp_path):
    (e,) = load(write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}]), tmp_path).dataset
    assert TOK.decode(e["input_ids"]) == TOK.apply_chat_template(CHAT, tokenize=False)
    assert trained_text(e) == f"hello{EOS}ciao{EOS}"
    reference = TOK.apply_chat_template(CHAT, chat_template=CHATML_TAGGED, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    assert e["input_ids"] == list(reference["input_ids"])
    assert [label != IGNORE for label in e["labels"]] == [bool(m) for m in reference["assistant_masks"]]


def test_chat_generation_tags_give_the_same_examples(tmp_path):
    """A template with {% generation %} goes through transformers' mask; a newline it tags after EOS is cut."""
    tagged_with_newline = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
                           "{% generation %}{{ m['content'] }}<|im_end|>{{ '\\n' }}{% endgeneration %}{% else %}"
                           "{{ m['content'] }}<|im_end|>{{ '\\n' }}{% endif %}{% endfor %}"
                           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    (plain,) = load(path, tmp_path).dataset
    for template in (CHATML_TAGGED, tagged_with_newline):
        (tagged,) = load(path, tmp_path, chat_template=template).dataset
        assert tagged == plain


def test_chat_template_override_from_text_or_file_and_eos_appended(tmp_path):
    template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")
    (tmp_path / "t.jinja").write_text(template)
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    for given in (template, str(tmp_path / "t.jinja")):
        (e,) = load(path, tmp_path, chat_template=given).dataset
        assert TOK.decode(e["input_ids"]) == ("[system] Be brief.\n[user] hi\n[assistant] hello\n[user] bye\n"
                                              "[assistant] ciao\n" + EOS)
        assert trained_text(e) == "hello\nciao\n" + EOS  # no EOS in the template: appended to the last turn


def test_chat_template_problems_are_clear_errors(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    no_template = byte_level_tokenizer()
    no_template.chat_template = None
    with pytest.raises(UserError, match=r"^'data.chat_template': the model's tokenizer has no chat template"):
        load(path, tmp_path, tokenizer=no_template)
    with pytest.raises(UserError, match=r"c.jsonl:1: the chat template failed on this conversation: roles alternate"):
        load(path, tmp_path, chat_template="{{ raise_exception('roles alternate') }}")
    marks_last = "{% for m in messages %}{% if loop.last %}> {% endif %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(UserError, match=r"c.jsonl:1: the chat template renders earlier turns differently"):
        load(path, tmp_path, chat_template=marks_last)


def test_train_on_prompt_trains_on_every_token(tmp_path):
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}])
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    for path in (pc, chat):
        (e,) = load(path, tmp_path, train_on_prompt=True).dataset
        assert e["labels"] == e["input_ids"]


def test_eos_is_trained_on_when_the_pad_token_is_eos(tmp_path):
    tokenizer = byte_level_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    rows = [{"prompt": "p", "completion": "long answer"}, {"prompt": "p", "completion": "a"}]
    examples = list(load(write_jsonl(tmp_path / "d.jsonl", rows), tmp_path, tokenizer=tokenizer).dataset)
    eos = tokenizer.eos_token_id
    batch = collate(examples, tokenizer.pad_token_id)
    eos_ids = batch["input_ids"] == eos  # the two EOS tokens and the padding
    assert eos_ids.sum() > 2
    assert (batch["labels"] == eos).sum() == 2  # each example's own EOS carries its label ...
    assert (batch["labels"][eos_ids] == IGNORE).sum() == eos_ids.sum() - 2  # ... the padding does not


def test_file_types_folders_and_column_names(tmp_path):
    rows = [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(3)]
    for name in ("jsonl", "json", "csv", "parquet", "folder"):
        (tmp_path / name).mkdir()
    write_jsonl(tmp_path / "jsonl" / "d.jsonl", rows)
    (tmp_path / "json" / "d.json").write_text(json.dumps(rows, indent=2))
    with (tmp_path / "csv" / "d.csv").open("w", newline="", encoding="utf-8-sig") as f:  # as spreadsheets write
        writer = csv.DictWriter(f, ["question", "answer"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "parquet" / "d.parquet")
    write_jsonl(tmp_path / "folder" / "a.jsonl", rows[:2])
    write_jsonl(tmp_path / "folder" / "b.jsonl", rows[2:])
    columns = {"prompt_column": "question", "completion_column": "answer"}
    reference = [TOK(r["question"])["input_ids"] + TOK(r["answer"])["input_ids"] + [TOK.eos_token_id] for r in rows]
    for path in ("jsonl/d.jsonl", "json/d.json", "csv/d.csv", "parquet/d.parquet", "folder"):
        examples = load(tmp_path / path, tmp_path, **columns)
        assert examples.format == "prompt_completion" and list(examples.dataset["input_ids"]) == reference, path


@pytest.mark.parametrize("row, fmt", [({"messages": CHAT, "text": "t"}, "chat"), ({"instruction": "i", "output": "o"},
                                      "alpaca"), ({"prompt": "p", "completion": "c"}, "prompt_completion"),
                                      ({"text": "t"}, "text")])
def test_format_is_detected_from_the_columns(tmp_path, row, fmt):
    assert load(write_jsonl(tmp_path / "d.jsonl", [row]), tmp_path).format == fmt


# ---------------------------------------------------------------------------------------- length


def test_truncate_cuts_the_prompt_first_then_the_end(tmp_path):
    rows = [{"prompt": "P" * 40 + "END:", "completion": "abcdef"}, {"prompt": "x:", "completion": "y" * 50}]
    examples = load(write_jsonl(tmp_path / "d.jsonl", rows), tmp_path, seq_len=16)
    kept_prompt, long_completion = examples.dataset
    assert examples.truncated == 2 and "2 truncated to train.seq_len" in examples.summary()
    assert TOK.decode(kept_prompt["input_ids"]) == "PPPPPEND:abcdef" + EOS  # 9 prompt + 7 completion tokens
    assert trained_text(kept_prompt) == "abcdef" + EOS
    assert TOK.decode(long_completion["input_ids"]) == "y" * 16 and trained_text(long_completion) == "y" * 16


def test_truncation_keeps_a_leading_bos():
    encoded = Encoded([9, 1, 2, 3, 4, 5], [IGNORE] * 4 + [4, 5], prompt_len=4)
    assert fit_to_length(encoded, EncodingRules("prompt_completion", 4), bos_id=9) == (
        [9, 3, 4, 5], [IGNORE] * 2 + [4, 5], "truncated")


def test_drop_and_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "short"}, {"text": "x" * 30}, {"text": "y" * 40}])
    dropped = load(path, tmp_path, seq_len=16, too_long="drop")
    assert len(dropped.dataset) == 1 and dropped.dropped == 2 and "2 dropped" in dropped.summary()
    with pytest.raises(UserError, match=r"d.jsonl:2: example is 31 tokens, longer than train.seq_len \(16\); set "
                                        r"data.too_long to truncate or drop \(2 bad rows in all"):
        load(path, tmp_path, seq_len=16, too_long="error")


# ---------------------------------------------------------------------------------------- bad data

BAD_DATA = [
    ("d.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n',
     r"d.jsonl:2: malformed JSON: Expecting value \(column 31\) \(the only bad row; data.skip_bad_rows: true"),
    ("d.jsonl", '{"prompt": "a", "completion": "b"}\n\n{"prompt": "a"}\n', r"d.jsonl:3: missing field 'completion'"),
    ("d.jsonl", '{"prompt": "a", "completion": 5}\n', r"d.jsonl:1: field 'completion' must be a string, got a number"),
    ("d.jsonl", '{"text": "ok"}\n{"text": "  "}\n', r"d.jsonl:2: empty 'text'"),
    ("d.jsonl", '{"text": "ok"}\n[1, 2]\n', r"d.jsonl:2: expected an object with named fields, got a list"),
    ("d.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n', r"d.jsonl:2: not UTF-8 text"),
    ("d.jsonl", '{"messages": [{"role": "user", "content": "hi"}, {"content": "yo"}]}\n',
     r"d.jsonl:1: 'messages' message 1: 'role' must be a string, got null"),
    ("d.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n', r"d.jsonl:1: 'messages' has no assistant"),
    ("d.jsonl", '{"foo": 1}\n', r"d.jsonl:1: cannot tell the data format from the fields \['foo'\]"),
    ("d.jsonl", "\n\n", r"'data.path': .*d.jsonl holds no examples"),
    ("d.jsonl", b'{"text": "a"}\n\x00\x01\x02', r"d.jsonl:2: binary data, not a .jsonl text file"),
    ("d.json", '[\n  {"text": "a"},\n  {"text": }\n]', r"d.json:3: malformed JSON: Expecting value"),
    ("d.csv", "prompt,completion\na,b\nc,d,e\n", r"d.csv:3: more fields than the header's 2"),
    ("d.parquet", b"PAR1 and then garbage", r"d.parquet: row 1: unreadable Parquet data"),
]


@pytest.mark.parametrize("name, content, message", BAD_DATA, ids=[m.split(": ", 1)[-1][:30] for *_, m in BAD_DATA])
def test_bad_data_is_one_line_naming_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError, match=message) as error:
        load(path, tmp_path)
    assert "\n" not in str(error.value)


def test_unreadable_file(tmp_path):
    (tmp_path / "d.jsonl").symlink_to("/proc/self/mem")  # a file that exists and cannot be read, even as root
    with pytest.raises(UserError, match=r"d.jsonl: cannot read: Input/output error"):
        load(tmp_path / "d.jsonl", tmp_path)


def test_skip_bad_rows_leaves_them_out_and_counts_them(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n{"text": "b"}\n{"txt": "c"}\n{"text": "d"}\n')
    with pytest.raises(UserError, match=r"d.jsonl:2: malformed JSON.*\(2 bad rows in all; data.skip_bad_rows: true"):
        load(path, tmp_path)
    examples = load(path, tmp_path, skip_bad_rows=True)
    assert [TOK.decode(ids) for ids in examples.dataset["input_ids"]] == ["a" + EOS, "b" + EOS, "d" + EOS]
    assert examples.skipped == 2 and "2 bad rows skipped" in examples.summary()


@pytest.mark.slow
def test_bad_data_fails_before_training_with_exit_code_2(tiny_llama, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 7}\n')
    (tmp_path / "recipe.yaml").write_text("seed: 1\n")
    out = tmp_path / "run"
    cli = subprocess.run([sys.executable, "-m", "qlora_kit", "train", tmp_path / "recipe.yaml",
                          f"model.path={tiny_llama}", f"data.path={data}", f"output_dir={out}"],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and not out.exists()
    assert own_lines(cli.stderr) == [f"qlora-kit: error: {data}:2: field 'completion' must be a string, got "
                                               "a number (the only bad row; data.skip_bad_rows: true skips them)"]


@pytest.mark.parametrize("overrides, key", [(["data.packing=fold"], "data.packing"), (["data.format=sharegpt"],
                         "data.format"), (["data.too_long=wrap"], "data.too_long"), (["data.eval_fraction=1"],
                         "data.eval_fraction"), (["data.eval_path=e.jsonl", "data.eval_fraction=0.1"],
                         "data.eval_fraction"), (["train.eval_every=5"], "train.eval_every"),
                         (["data.num_proc=-1"], "data.num_proc"), (["data.text_column="], "data.text_column")])
def test_data_keys_are_validated(overrides, key):
    with pytest.raises(UserError, match=f"'{key}'"):
        load_recipe(None, overrides)


@pytest.mark.parametrize("fmt, row", [
    ("prompt_completion", {"prompt": "p" * 300_000 + "Reverse: x\n", "completion": "wordy " * 400_000}),
    ("text", {"text": "long document " * 200_000}),
    ("chat", {"messages": [{"role": "user", "content": "u" * 300_000}, {"role": "assistant", "content": "a" * 9},
                           {"role": "user", "content": "v" * 10}, {"role": "assistant", "content": "b" * 900_000}]}),
])
@pytest.mark.slow
def test_a_huge_row_is_cut_before_tokenising_to_exactly_what_truncation_keeps(tmp_path, monkeypatch, fmt, row):
    path = write_jsonl(tmp_path / "big.jsonl", [row])
    seq_len = 64
    expected = fit_to_length(encode_row(row, TOK, EncodingRules(fmt, seq_len, chat_template=TOK.chat_template)),
                             EncodingRules(fmt, seq_len), TOK.bos_token_id)  # the whole row tokenised, then cut
    seen = []
    tokenize = type(TOK).__call__
    monkeypatch.setattr(type(TOK), "__call__", lambda self, text, *a, **kw: seen.append(len(text)) or
                        tokenize(self, text, *a, **kw))
    example = load(path, tmp_path, seq_len=seq_len).dataset[0]
    assert (example["input_ids"], example["labels"]) == (expected[0], expected[1])
    assert max(seen) <= 4 * seq_len * MAX_CHARS_PER_TOKEN  # the work per row is bounded by seq_len, not the row


@pytest.mark.parametrize("too_long, expected", [("drop", "no examples left"), ("error", "far longer than")])
def test_a_huge_row_is_dropped_or_refused_without_tokenising_it(tmp_path, too_long, expected):
    path = write_jsonl(tmp_path / "big.jsonl", [{"prompt": "p", "completion": "c" * 5_000_000}])
    with pytest.raises(UserError, match=expected):
        load(path, tmp_path, seq_len=64, too_long=too_long)


# ---------------------------------------------------------------------------------------- caching and eval


def test_tokenisation_is_cached_and_redone_when_the_file_or_a_setting_changes(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "a"}, {"prompt": "p", "completion": "b"}])
    first, again = load(path, tmp_path), load(path, tmp_path)
    assert again.dataset.cache_files == first.dataset.cache_files
    assert all(f["filename"].startswith(str(tmp_path / "cache")) for f in first.dataset.cache_files)
    write_jsonl(path, [{"prompt": "p", "completion": c} for c in "abc"])
    assert len(load(path, tmp_path).dataset) == 3
    assert load(path, tmp_path, train_on_prompt=True).dataset[0]["labels"][0] != IGNORE


def test_parallel_tokenisation_gives_the_same_examples(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)])
    one = load(path, tmp_path / "one")
    two = load(path, tmp_path / "two", num_proc=2)
    assert list(two.dataset) == list(one.dataset)


def test_eval_fraction_and_eval_path(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i}"} for i in range(10)])
    cfg = DataConfig(path=str(path), eval_fraction=0.2)
    train_set, held_out = load_data(cfg, TOK, 64, seed=0, cache_dir=tmp_path / "cache")
    texts = [TOK.decode(ids) for ids in list(train_set.dataset["input_ids"]) + list(held_out.dataset["input_ids"])]
    assert (len(train_set.dataset), len(held_out.dataset)) == (8, 2)
    assert sorted(texts) == [f"row {i}{EOS}" for i in range(10)]  # disjoint, and together all of the data
    eval_path = write_jsonl(tmp_path / "e.jsonl", [{"text": "held out"}])
    _, held_out = load_data(DataConfig(path=str(path), eval_path=str(eval_path)), TOK, 64, 0, cache_dir=tmp_path / "c")
    assert held_out.format == "text" and len(held_out.dataset) == 1
    with pytest.raises(UserError, match=r"'data.eval_fraction': 0.95 of 10 examples leaves none to train on"):
        load_data(DataConfig(path=str(path), eval_fraction=0.95), TOK, 64, 0, cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------------------------------- batching


def random_examples(lengths, seed=0):
    """Random token examples, alternately with a prompt (first third, no loss) and trained on every token."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for k, n in enumerate(lengths):
        ids = torch.randint(3, 250, (n,), generator=g).tolist()
        prompt = n // 3 if k % 2 else 0
        examples.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:], "length": n})
    return examples


def per_example_loss_sums(logits, batch, owner, n_examples):
    """Sum of token losses per example; `owner` gives each position's example (-1: padding), built from the layout."""
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                             ignore_index=IGNORE, reduction="none")
    owner = owner[:, 1:].flatten()
    return torch.zeros(n_examples).index_add_(0, owner[owner >= 0], losses[owner >= 0])


def layouts(examples, seq_len):
    """(name, batch, owner) for the three layouts of the same examples."""
    lengths = [e["length"] for e in examples]

    def row_of(indices):
        return torch.cat([torch.full((lengths[i],), i) for i in indices])

    padded_owner = torch.full((len(examples), max(lengths)), -1)
    for i, n in enumerate(lengths):
        padded_owner[i, :n] = i
    plan = pack_rows(lengths, seq_len)
    pack_owner = torch.full((len(plan), max(sum(lengths[i] for i in r) for r in plan)), -1)
    for r, row in enumerate(plan):
        pack_owner[r, :sum(lengths[i] for i in row)] = row_of(row)
    return [("padding_free", collate_padding_free(examples), row_of(range(len(examples)))[None]),
            ("pack", collate_rows([[examples[i] for i in row] for row in plan], pad_id=0), pack_owner),
            ("padded", collate(examples, pad_id=0), padded_owner)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_each_layout_gives_each_example_its_loss_alone(tiny_models, arch):
    # The model's own config keeps use_cache on: with it, position ids alone would not separate the examples.
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], attn_implementation="sdpa").eval()
    examples = random_examples([6, 11, 16, 21, 26])
    with torch.no_grad():
        alone = torch.stack([per_example_loss_sums(model(torch.tensor([e["input_ids"]])).logits, collate([e], 0),
                                                   torch.zeros(1, e["length"], dtype=torch.long), 1)[0]
                             for e in examples])
        totals = []
        for name, batch, owner in layouts(examples, seq_len=32):
            logits = model(**forward_inputs(batch)).logits
            torch.testing.assert_close(per_example_loss_sums(logits, batch, owner, len(examples)), alone,
                                       rtol=1e-5, atol=1e-5, msg=name)
            totals.append(token_loss_sum(model, batch))
        for loss_sum, n in totals:
            assert n == totals[0][1] and torch.allclose(loss_sum, totals[0][0], rtol=1e-5)
        free = collate_padding_free(examples)  # the control: without the block mask, examples see each other
        leaky = model(input_ids=free["input_ids"], position_ids=free["position_ids"]).logits
        owner = layouts(examples, 32)[0][2]
        assert not torch.allclose(per_example_loss_sums(leaky, free, owner, len(examples)), alone, atol=1e-2)


class QuadraticTensors(TorchDispatchMode):
    """Records every op that makes a tensor whose last two dims are (t, t): over a row of t tokens, a block mask
    or attention scores across the whole row."""

    def __init__(self, t: int) -> None:
        super().__init__()
        self.t, self.ops = t, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(x, torch.Tensor) and x.dim() >= 2 and tuple(x.shape[-2:]) == (self.t, self.t)
               for x in tree_leaves(out)):
            self.ops.append(str(func))
        return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gemma2"])
def test_rows_attend_per_example_and_build_no_row_sized_mask(tiny_models, arch):
    """With the attention qlora-kit sets up (transformers' choice of SDPA or eager, then `use_segment_attention`;
    use_cache left on), each example of a concatenated row gets its loss alone. Models whose every layer attends
    per example from the spans make no (T x T) tensor at all; Gemma 2 refuses SDPA, runs eager attention, and
    keeps the block mask (which also shows that the watch sees one)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
    use_segment_attention(model)
    per_example = arch != "gemma2"
    assert needs_block_mask(model) is not per_example
    examples = random_examples([6, 11, 16, 21, 26])
    with torch.no_grad():
        alone = torch.stack([per_example_loss_sums(model(torch.tensor([e["input_ids"]])).logits, collate([e], 0),
                                                   torch.zeros(1, e["length"], dtype=torch.long), 1)[0]
                             for e in examples])
        for name, batch, owner in layouts(examples, seq_len=32)[:2]:  # the concatenated layouts
            with QuadraticTensors(batch["input_ids"].shape[1]) as watch:
                logits = model(**forward_inputs(batch, model)).logits
            torch.testing.assert_close(per_example_loss_sums(logits, batch, owner, len(examples)), alone,
                                       rtol=1e-5, atol=1e-5, msg=name)
            if name == "padding_free":  # one row of 80 tokens; no example is longer than 26
                assert bool(watch.ops) is not per_example, watch.ops
            # the training loop's loss, with the inputs it gives the model
            torch.testing.assert_close(token_loss_sum(model, batch)[0], alone.sum(), rtol=1e-5, atol=1e-5)


def reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                     enable_gqa=False):
    """`torch.nn.attention.varlen.varlen_attn`'s contract, by SDPA per sequence (the kernel runs on CUDA only):
    (total, heads, head_dim) q/k/v cut into sequences at `cu_seq_q`; window (-1, 0) is causal."""
    assert window_size == (-1, 0) and torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32
    bounds = cu_seq_q.tolist()
    assert bounds[0] == 0 and bounds[-1] == query.shape[0] and max_q == max_k == max(b - a for a, b in pairwise(bounds))
    return torch.cat([F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in (query, key, value)),
                                                     is_causal=True, scale=scale, enable_gqa=enable_gqa).transpose(0, 1)
                      for a, b in pairwise(bounds)])


def segments_and_qkv(t, dtype=torch.float32, device="cpu", seed=0):
    """Two rows of t tokens (three examples; one example and padding), 4 query heads sharing 2 key/value heads."""
    segments = (((0, t // 4), (t // 4, t - 5), (t - 5, t)), ((0, 2 * t // 3),))
    g = torch.Generator(device).manual_seed(seed)
    q, k, v = (torch.randn(2, heads, t, 16, generator=g, device=device).to(dtype).requires_grad_()
               for heads in (4, 2, 2))
    real = torch.ones(2, t, dtype=torch.bool, device=device)
    real[1, 2 * t // 3:] = False
    return segments, q, k, v, real


def test_the_varlen_branch_cuts_rows_where_the_examples_are(monkeypatch):
    """`segment_sdpa`'s CUDA branch (one variable-length kernel call for the whole batch), simulated on CPU with
    the kernel's contract, gives what per-example SDPA gives, and finite numbers on padding."""
    monkeypatch.setattr(attention, "varlen_attn", reference_varlen)
    monkeypatch.setattr(attention, "_varlen_ok", lambda *args: True)
    segments, q, k, v, real = segments_and_qkv(12)
    out, _ = segment_sdpa(nn.Module(), q, k, v, None, scaling=0.3, **{SEGMENTS: segments})
    expected = per_example_sdpa(q, k, v, segments, 0.0, 0.3, gqa=True)
    assert out.shape == expected.shape == (2, 12, 4, 16) and out.isfinite().all()
    torch.testing.assert_close(out[real], expected[real])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_varlen_kernel_equals_per_example_sdpa(dtype):
    """On CUDA, fp16/bf16 rows go through `torch.nn.attention.varlen` (flash attention has no fp32, which stays
    per example); outputs and gradients equal per-example SDPA's."""
    segments, q, k, v, real = segments_and_qkv(1024, dtype, "cuda")
    assert attention._varlen_ok(q, k, v, 0.0, True) is (dtype != torch.float32)
    out, _ = segment_sdpa(nn.Module(), q, k, v, None, scaling=0.25, **{SEGMENTS: segments})
    expected = per_example_sdpa(q, k, v, segments, 0.0, 0.25, gqa=True)
    tol = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(out[real], expected[real], rtol=tol, atol=tol)
    upstream = torch.randn_like(out[real])
    grads = torch.autograd.grad(out[real], (q, k, v), upstream)
    expected_grads = torch.autograd.grad(expected[real], (q, k, v), upstream)
    for name, grad, want in zip("qkv", grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, want, rtol=2 * tol, atol=2 * tol, msg=name)


def test_padding_free_gradients_equal_padded_gradients(tiny_llama, tmp_path):
    """The same micro-batch padded or padding-free gives the same LoRA gradients: the same training trajectory."""
    recipe = load_recipe(None, [f"model.path={tiny_llama}", f"output_dir={tmp_path}", "lora.dropout=0", "lora.r=4"])
    model = build_model(recipe, torch.device("cpu")).model.train()
    examples = random_examples([5, 17, 9, 30], seed=1)
    grads = []
    for batch in (collate(examples, pad_id=0), collate_padding_free(examples)):
        loss_sum, n = token_loss_sum(model, batch)
        (loss_sum / n).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad})
        model.zero_grad(set_to_none=True)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_block_causal_mask_against_a_loop():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    mask = block_causal_mask(position_ids)
    for b in range(2):
        starts = [i for i in range(9) if position_ids[b, i] == 0]
        block = [max(s for s in starts if s <= i) for i in range(9)]
        expected = torch.tensor([[block[i] == block[j] and j <= i for j in range(9)] for i in range(9)])
        assert torch.equal(mask[b, 0], expected)


def test_pack_rows_fills_rows_and_places_each_example_once():
    lengths = torch.randint(10, 200, (500,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = pack_rows(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    assert sum(lengths) / (len(rows) * 512) > 0.97  # best-fit decreasing: rows nearly full


def test_length_grouped_batches_cut_padding_and_reshuffle():
    lengths = torch.randint(1, 500, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = LengthGroupedBatches(lengths, 8, seed=0)
    first, second = list(sampler), list(sampler)
    assert len(first) == len(sampler) == 125 and first != second
    assert sorted(i for batch in first for i in batch) == list(range(1000))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in first)
    random_padded = sum(8 * max(lengths[i:i + 8]) for i in range(0, 1000, 8))
    assert sum(lengths) / padded > 0.9 > sum(lengths) / random_padded


# ---------------------------------------------------------------------------------------- training

WORDS = ("alpha", "bravo", "delta", "tango")
FORMAT_ROWS = {
    "prompt_completion": [{"prompt": f"Reverse: {w}\n", "completion": w[::-1]} for w in WORDS],
    "alpaca": [{"instruction": "Reverse the word.", "input": w, "output": w[::-1]} for w in WORDS],
    "chat": [{"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": w[::-1]}]} for w in WORDS],
    "text": [{"text": f"{w} {w[::-1]}"} for w in WORDS],
}


@pytest.mark.parametrize("fmt, packing", [("prompt_completion", "none"), ("alpaca", "pack"), ("chat", "padding_free"),
                                          ("text", "padding_free")])
def test_every_format_trains_from_jsonl(tiny_llama, tmp_path, capsys, fmt, packing):
    data = write_jsonl(tmp_path / "d.jsonl", FORMAT_ROWS[fmt])
    train(load_recipe(None, [f"model.path={tiny_llama}", f"data.path={data}", f"output_dir={tmp_path / 'run'}",
                             f"data.packing={packing}", "train.seq_len=256", "train.micro_batch_size=2",
                             "train.max_steps=2", "lora.r=4"]))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    assert f"data: 4 examples ({fmt})" in capsys.readouterr().err


def test_a_model_that_refuses_sdpa_trains_padding_free(tiny_models, tmp_path):
    """Gemma 2 (its attention soft-caps logits, which SDPA cannot) trains on eager attention."""
    data = write_jsonl(tmp_path / "d.jsonl", FORMAT_ROWS["prompt_completion"])
    train(load_recipe(None, [f"model.path={tiny_models['gemma2']}", f"data.path={data}",
                             f"output_dir={tmp_path / 'run'}", "train.seq_len=64", "train.micro_batch_size=2",
                             "train.max_steps=2", "lora.r=4"]))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)


def test_eval_loss_is_logged_and_equals_the_trained_models_loss(tiny_llama, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", FORMAT_ROWS["prompt_completion"])
    held_out = write_jsonl(tmp_path / "e.jsonl", [{"prompt": f"Reverse: {w}\n", "completion": w[::-1]}
                                                  for w in ("echo", "golf", "hotel")])
    result = train(load_recipe(None, [f"model.path={tiny_llama}", f"data.path={data}", f"data.eval_path={held_out}",
                                      f"output_dir={tmp_path / 'run'}", "train.seq_len=64", "train.micro_batch_size=2",
                                      "train.max_steps=3", "train.eval_every=2", "train.lr=1e-2", "lora.r=4"]))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert ["eval_loss" in r for r in records] == [False, True, True]
    assert all(r["positions"] == r["tokens"] for r in records)  # padding-free: every computed position is a real token
    assert "real tokens filled 100.0% of the positions computed" in capsys.readouterr().err
    examples = list(load_examples(held_out, TOK, 64, cache_dir=tmp_path / "cache").dataset)
    with torch.no_grad():
        loss_sum, n = token_loss_sum(result.model.eval(), collate(examples, pad_id=0))
    assert result.eval_loss == records[-1]["eval_loss"]
    assert abs(result.eval_loss - loss_sum.item() / n) < 1e-5


def test_the_shipped_data_still_loads(tmp_path):
    examples = load(Path(__file__).parent.parent / "recipes" / "data" / "reverse-words.jsonl", tmp_path)
    assert examples.format == "prompt_completion" and len(examples.dataset) == 256
