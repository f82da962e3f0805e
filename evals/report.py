"""What every eval harness ends with: the command that reproduces it, and its report as ``NAME.json``, ``NAME.md`` and
``NAME.png`` under the results directory."""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def command_line(module: str, argv: Sequence[str]) -> str:
    """``python -m MODULE ARGS`` as a shell would take it back (quoted), for the report's "Command" section."""
    return f"python -m {module} " + " ".join(shlex.quote(a) for a in argv)


RERUN = (  # the intro of a harness whose runs are memoised under runs/evals/
    "Command (re-running it loads the finished runs from `runs/evals/`; deleting them retrains bit-identically, "
    "except wall times):"
)


def command_section(command: str, intro: str = "Command:") -> list[str]:
    """The report's Markdown lines that name the command reproducing it (``intro``, then the command fenced)."""
    return [intro, "", "```", command, "```"]


def write_report(results_dir: Path, name: str, data: Any, markdown: str, plot: Callable[[Path], None]) -> Path:
    """Write ``data`` (JSON), ``markdown`` and the ``plot`` (called with the PNG path); returns the path stem."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / name
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown)
    plot(stem.with_suffix(".png"))
    log.info("wrote %s.{md,json,png}", stem)
    return stem
