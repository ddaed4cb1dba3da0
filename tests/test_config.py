from pathlib import Path

import pytest

from qlora_kit.config import Recipe, load_recipe, save_recipe, valid_keys
from qlora_kit.errors import UserError

RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))
CONTRACT = ["model.path", "output_dir", "seed", "data.path", "train.max_steps", "train.epochs", "train.seq_len",
            "train.micro_batch_size", "train.grad_accum", "train.lr", "train.gradient_checkpointing", "lora.r",
            "lora.alpha", "lora.dropout", "lora.target_modules", "lora.use_rslora", "optim.name",
            "quant.quant_type", "quant.double_quant", "quant.compute_dtype"]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_contract_keys_exist():
    assert set(CONTRACT) <= set(valid_keys())


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(recipe):
    assert load_recipe(recipe).model.path


def test_overrides_are_converted_to_the_field_type(tmp_path):
    recipe = load_recipe(write(tmp_path, "train:\n  lr: 1e-4\n"),
                         ["train.max_steps=7", "train.gradient_checkpointing=false", "lora.alpha=8",
                          "lora.target_modules=q_proj,v_proj", "model.adapter=null", "train.seq_len=1e3"])
    assert recipe.train.lr == 1e-4 and isinstance(recipe.train.lr, float)  # PyYAML reads 1e-4 as a string
    assert recipe.train.max_steps == 7 and recipe.train.seq_len == 1000
    assert recipe.train.gradient_checkpointing is False
    assert recipe.lora.alpha == 8.0 and recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.model.adapter is None


def test_unknown_key_names_it_the_closest_key_and_the_line(tmp_path):
    path = write(tmp_path, "seed: 1\ntrain:\n  max_steps: 3\n  learning_rate: 0.1\n")
    with pytest.raises(UserError) as e:
        load_recipe(path)
    assert "'train.learning_rate'" in str(e.value) and "train.lr" in str(e.value) and f"{path}:4" in str(e.value)


def test_aliases_from_other_tools_are_suggested():
    with pytest.raises(UserError, match="did you mean 'train.grad_accum'"):
        load_recipe(None, ["train.gradient_accumulation_steps=4"])


def test_unknown_override_key():
    with pytest.raises(UserError, match=r"command line: unknown recipe key 'lora.rank'; did you mean 'lora.r'"):
        load_recipe(None, ["lora.rank=8"])


@pytest.mark.parametrize("override, key", [
    ("lora.r=0", "lora.r"), ("lora.r=-4", "lora.r"), ("optim.name=sgd", "optim.name"),
    ("quant.quant_type=int4", "quant.quant_type"), ("train.lr=fast", "train.lr"), ("lora.r=2.5", "lora.r"),
    ("train.micro_batch_size=0", "train.micro_batch_size"), ("lora.dropout=1.5", "lora.dropout"),
    ("quant.compute_dtype=float8", "quant.compute_dtype"), ("train.gradient_checkpointing=maybe",
                                                            "train.gradient_checkpointing"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(UserError, match=f"'{key}'"):
        load_recipe(None, [override])


def test_bad_value_in_file_names_the_line(tmp_path):
    with pytest.raises(UserError, match=r"recipe.yaml:3: 'lora.r' must be a positive integer"):
        load_recipe(write(tmp_path, "lora:\n  alpha: 16\n  r: 0\n"))


def test_max_steps_absent_means_epochs(tmp_path):
    recipe = load_recipe(write(tmp_path, "train:\n  epochs: 3\n"))
    assert recipe.train.max_steps == 0 and recipe.train.epochs == 3


def test_saved_recipe_loads_back_identical(tmp_path):
    recipe = load_recipe(None, ["lora.target_modules=[q_proj, o_proj]", "train.lr=3e-5", "seed=7"])
    save_recipe(recipe, tmp_path / "resolved.yaml")
    assert load_recipe(tmp_path / "resolved.yaml") == recipe != Recipe()


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"recipe.yaml:\d+: invalid YAML"):
        load_recipe(write(tmp_path, "train:\n  lr: [1\n"))
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_readme_documents_every_key():
    readme = Path(__file__).parent.parent.joinpath("README.md").read_text()
    assert [k for k in valid_keys() if f"`{k}`" not in readme] == []
