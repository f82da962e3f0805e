"""The README's LangChain example runs as written and prints exactly what the README says it prints (an answer about
people it heard of only in earlier, consolidated windows, and the sleep count): on every run (not only the first in a
folder), and under ``ainvoke`` / ``astream`` as under ``invoke``."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs the README's code unchanged, with `create_agent` returning the agent behind a proxy whose `invoke` goes through
# `ainvoke` or `astream` instead (each call on a new event loop, as a script calling asyncio.run would).
ASYNC_PRELUDE = """
import asyncio
import langchain.agents

_create_agent = langchain.agents.create_agent


class _Via:
    def __init__(self, graph, mode):
        self.graph, self.mode = graph, mode

    def invoke(self, inp, config, **kwargs):
        if self.mode == "ainvoke":
            return asyncio.run(self.graph.ainvoke(inp, config, **kwargs))

        async def last_value():
            last = None
            async for value in self.graph.astream(inp, config, stream_mode="values", **kwargs):
                last = value
            return last

        return asyncio.run(last_value())

    def get_state(self, config):
        return self.graph.get_state(config)


langchain.agents.create_agent = lambda *a, **k: _Via(_create_agent(*a, **k), {mode!r})
"""


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## LangChain in 15 lines", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README lost its LangChain example"
    return match.group(1)


def promised_output() -> str:
    """What the README says the example prints: the ``# -> ...`` comment on its print line."""
    match = re.search(r"print\(.*#\s*->\s*(.+)$", readme_example(), re.M)
    assert match, "the README example lost its '# -> output' comment"
    return match.group(1).split("(")[0].strip()


def story_and_question() -> tuple[list[str], str]:
    """The example's ``story`` list and the question it asks (literals in the README's code)."""
    tree = ast.parse(readme_example())
    story = next(
        ast.literal_eval(n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "story" for t in n.targets)
    )
    question = next(
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.endswith("?")
    )
    return story, question


def test_readme_promises_the_true_answer() -> None:
    """The answer the README shows is the story's true relation (an independent solver of reasoning-gym's rules)."""
    from agentsleep.tasks import get_task
    from agentsleep.tasks.family import _package_words
    from tests.tasks.test_family import solve

    story, question = story_and_question()
    task = get_task("family")
    for line in [*story, question]:
        task.config.encode(line)  # every word is in the shipped checkpoint's vocabulary
    relation, hops = solve(story, question, set(_package_words()[0]))
    assert promised_output().split()[0] == relation and hops >= 2  # a multi-hop question


def run_example(cwd: Path, prelude: str = "") -> str:
    if not (cwd / "checkpoints").exists():
        (cwd / "checkpoints").symlink_to(ROOT / "checkpoints")  # the example's relative checkpoint path
    code = prelude + "\n" + readme_example()
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_readme_langchain_example_runs_on_every_run(tmp_path: Path) -> None:
    assert len(readme_example().strip().splitlines()) <= 16
    promised = promised_output()
    answer, sleeps = promised.split()
    assert answer.isalpha() and int(sleeps) >= 2  # an English word, after the story was consolidated into S
    for _ in range(2):  # the second run in the same folder finds the first run's snapshots.db
        assert run_example(tmp_path) == promised
    assert (tmp_path / "snapshots.db").is_file()


@pytest.mark.parametrize("mode", ["ainvoke", "astream"])
def test_readme_langchain_example_runs_async(tmp_path: Path, mode: str) -> None:
    assert run_example(tmp_path, ASYNC_PRELUDE.format(mode=mode)) == promised_output()
