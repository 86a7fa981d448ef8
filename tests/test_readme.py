"""The README is the front door: its Quickstart is what CI runs, and its Python examples run."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _code_blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_quickstart_has_two_commands_and_ci_runs_the_test_one():
    quickstart = README.split("## Quickstart", 1)[1]
    block = re.search(r"```\w*\n(.*?)```", quickstart, flags=re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 2
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert commands[1].strip() in ci_lines


@pytest.mark.parametrize("index", range(len(_code_blocks("python"))))
def test_python_examples_run(index, monkeypatch, capsys):
    monkeypatch.delenv("FASTPO_BACKEND", raising=False)
    exec(compile(_code_blocks("python")[index], f"README.md[python block {index}]", "exec"), {})
