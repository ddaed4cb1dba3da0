"""Rewrite each GPU recipe's "Expected peak memory" line, and its row in the README's recipe table, with what
`qlora-kit estimate` now says for the command the header gives (tests/test_estimate.py fails while a header is
stale).

    python tools/refresh_recipe_headers.py
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from qlora_kit.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
RECIPES, README = ROOT / "recipes", ROOT / "README.md"
QUOTED = re.compile(r"Expected peak memory: ([0-9.]+) GiB")


def current_estimate(recipe: Path) -> str:
    command = re.search(r"#\s+qlora-kit estimate (\S+) (.*)", recipe.read_text())
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli(["estimate", str(recipe), *command.group(2).split()]) == 0
    return re.search(r"total\s+([0-9.]+) GiB", out.getvalue()).group(1)


def main() -> None:
    readme = README.read_text()
    for recipe in sorted(RECIPES.glob("*.yaml")):
        text = recipe.read_text()
        if not QUOTED.search(text):
            continue
        total = current_estimate(recipe)
        recipe.write_text(QUOTED.sub(f"Expected peak memory: {total} GiB", text, count=1))
        row = re.compile(rf"^(\| `recipes/{re.escape(recipe.name)}` \|.*\| )[0-9.]+ GiB \|$", re.M)
        readme = row.sub(rf"\g<1>{total} GiB |", readme)
        print(f"{recipe.name}: {total} GiB")
    README.write_text(readme)


if __name__ == "__main__":
    main()
