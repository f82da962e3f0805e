"""The README's LangChain example runs as written and recalls a fact that only survives in S: on every run (not only
the first in a folder), and under ``ainvoke`` / ``astream`` as under ``invoke``."""

from __future__ import annotations

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


def run_example(cwd: Path, prelude: str = "") -> tuple[str, int]:
    if not (cwd / "checkpoints").exists():
        (cwd / "checkpoints").symlink_to(ROOT / "checkpoints")  # the example's relative checkpoint path
    code = prelude + "\n" + readme_example()
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    answer, sleeps = out.stdout.split()[-2:]
    return answer, int(sleeps)


def test_readme_langchain_example_runs_on_every_run(tmp_path: Path) -> None:
    assert len(readme_example().strip().splitlines()) <= 16
    for _ in range(2):  # the second run in the same folder finds the first run's snapshots.db
        answer, sleeps = run_example(tmp_path)
        assert answer == "5"  # V042 = 5 was heard in the first window and evicted by the first sleep
        assert sleeps == 4
    assert (tmp_path / "snapshots.db").is_file()


@pytest.mark.parametrize("mode", ["ainvoke", "astream"])
def test_readme_langchain_example_runs_async(tmp_path: Path, mode: str) -> None:
    answer, sleeps = run_example(tmp_path, ASYNC_PRELUDE.format(mode=mode))
    assert (answer, sleeps) == ("5", 4)
