"""The README's LangChain example runs as written and recalls a fact that only survives in S."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## LangChain in 15 lines", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README lost its LangChain example"
    return match.group(1)


def test_readme_langchain_example_runs(tmp_path: Path) -> None:
    code = readme_example()
    assert len(code.strip().splitlines()) <= 16
    (tmp_path / "checkpoints").symlink_to(ROOT / "checkpoints")  # the example's relative checkpoint path
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    answer, sleeps = out.stdout.split()[-2:]
    assert answer == "5"  # V042 = 5 was heard in the first window and evicted by the first sleep
    assert int(sleeps) >= 2
    assert (tmp_path / "snapshots.db").is_file()
