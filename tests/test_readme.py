"""The documentation's commands run as printed: every fenced ``bash`` / ``sh`` / ``shell`` and ``python`` block of
the Markdown files in :data:`MARKDOWN` is executed, in order, in one working folder per file, so the docs cannot drift
from the code.

What the blocks find in that folder (a newcomer's first hour, shrunk to seconds):

* ``mydata/``: the demo dataset, tiny (8 train / 4 val images of 96 px);
* ``photos/`` (two val images), ``more/a.jpg``, ``scans/s1/b.png``: images to predict on;
* ``.venv/bin/cls2det`` and ``cls2det`` / ``python`` on the PATH: this interpreter's environment.

A block is marked by HTML comments on the lines just above its fence (invisible on GitHub, plain in the source):

* ``<!-- skip: REASON -->``: not run (it needs a GPU, a download, COCO, or takes minutes to hours);
* ``<!-- test-replace: {"TEXT": "SMALLER", ...} -->``: run with each TEXT replaced (e.g. ``--epochs 12`` by one
  step at a small input size); the block as printed stays what a user runs.

A block that fails names its file and line, with the output's tail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELLS = {"bash", "sh", "shell"}
PYTHONS = {"python", "py"}
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*(?P<kind>skip|test-replace):\s*(?P<value>.*?)\s*-->\s*$")
BLOCK_TIMEOUT_S = 600


@dataclass
class Block:
    """One fenced code block: where it starts, its language, its code (dedented), its markers."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None = None  # the reason, when marked <!-- skip: ... -->
    replace: dict[str, str] | None = None

    @property
    def runs(self) -> bool:
        return self.skip is None and self.lang in SHELLS | PYTHONS

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path}:{self.line}"

    def code_to_run(self) -> str:
        code = self.code
        for old, new in (self.replace or {}).items():
            if old not in code:
                raise AssertionError(f"{self.where}: test-replace text {old!r} is not in the block")
            code = code.replace(old, new)
        return code


def markdown_blocks(path: Path) -> list[Block]:
    """Every fenced block of Markdown file ``path``, with the markers of the comment lines just above it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, start = len(opening["indent"]), i
        i += 1
        body = []
        while i < len(lines) and not re.match(rf"^ {{0,{indent}}}```\s*$", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        i += 1  # the closing fence
        block = Block(path, start + 1, opening["lang"].lower(), "\n".join(body) + "\n")
        above = start - 1
        while above >= 0 and (marker := MARKER.match(lines[above])) is not None:
            if marker["kind"] == "skip":
                block.skip = marker["value"] or "(no reason given)"
            else:
                block.replace = json.loads(marker["value"])
            above -= 1
        blocks.append(block)
    return blocks


def make_workdir(folder: Path) -> dict[str, str]:
    """Fill ``folder`` with what the blocks expect (module docstring); returns their environment."""
    from PIL import Image

    from cls2det.data import generate_demo, load_split

    data = generate_demo(folder / "mydata", seed=0, train_images=8, val_images=4, image_size=96)
    val = load_split(data, "val")
    paths = [val.image_path(image) for image in val.images[:3]]
    (folder / "photos").mkdir()
    for path in paths[:2]:
        shutil.copy(path, folder / "photos" / path.name)
    (folder / "more").mkdir()
    Image.open(paths[2]).convert("RGB").save(folder / "more" / "a.jpg")
    (folder / "scans" / "s1").mkdir(parents=True)
    shutil.copy(paths[2], folder / "scans" / "s1" / "b.png")
    (folder / ".venv").symlink_to(sys.prefix)
    environment = dict(os.environ)
    environment["PATH"] = f"{Path(sys.prefix) / 'bin'}{os.pathsep}{environment.get('PATH', '')}"
    environment["OMP_NUM_THREADS"] = "1"  # the 2 shared cores of the CI machine
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


def run_block(block: Block, folder: Path, environment: dict[str, str]) -> None:
    code = block.code_to_run()
    if block.lang in SHELLS:
        command = ["bash", "-e", "-o", "pipefail", "-c", code]
    else:
        command = [sys.executable, "-c", code]
    result = subprocess.run(
        command, cwd=folder, env=environment, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S
    )
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-25:])
        raise AssertionError(f"{block.where}: the {block.lang} block exited {result.returncode}:\n{tail}")


# ----------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_runnable_block_runs(path, tmp_path):
    environment = make_workdir(tmp_path)
    for block in markdown_blocks(path):
        if block.runs:
            run_block(block, tmp_path, environment)


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_skipped_block_says_why_and_every_replacement_applies(path):
    for block in markdown_blocks(path):
        if block.skip is not None:
            assert block.skip != "(no reason given)", f"{block.where}: <!-- skip: --> needs a reason"
        else:
            block.code_to_run()  # raises when a test-replace text is not in the block


def test_markdown_blocks_reads_fences_markers_and_indented_blocks(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n"
        "<!-- skip: needs COCO -->\n"
        "```bash\n"
        "cls2det data check coco.yaml\n"
        "```\n"
        "\n"
        "* a list item:\n"
        "\n"
        '  <!-- test-replace: {"--epochs 2": "--epochs 1"} -->\n'
        "  ```bash\n"
        "  cls2det teacher mydata --out t --epochs 2\n"
        "  ```\n"
        "```\n"
        "a layout, not code\n"
        "```\n"
    )
    skipped, indented, plain = markdown_blocks(page)
    assert (skipped.line, skipped.skip, skipped.runs) == (3, "needs COCO", False)
    assert indented.code_to_run() == "cls2det teacher mydata --out t --epochs 1\n" and indented.runs
    assert (plain.lang, plain.runs) == ("", False)
