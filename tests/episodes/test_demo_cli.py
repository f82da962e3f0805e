"""`agentsleep demo`: help, and a one-episode run on tiny checkpoints that writes the report and the plots."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from agentsleep.cli import main


def test_help() -> None:
    runner = CliRunner()
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0 and "demo" in top.output
    res = runner.invoke(main, ["demo", "--help"])
    assert res.exit_code == 0
    for opt in ("--out", "--episodes", "--english-episodes", "--seed", "--checkpoints", "--kinds", "--spawn"):
        assert opt in res.output


def test_default_demo_is_english_with_transcripts(suite: Path, tmp_path: Path) -> None:
    """The default demo speaks English: family stories in, one-word answers out, transcripts in the report."""
    out = tmp_path / "demo"
    res = CliRunner().invoke(
        main, ["demo", "--checkpoints", str(suite), "--out", str(out), "--english-episodes", "2", "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    assert "Family relationships in English" in res.output and "revived runs equal" in res.output
    assert "  user: " in res.output and "agent (sleep N=2):" in res.output and "[sleep 1:" in res.output
    md = (out / "report.md").read_text()
    assert "### Transcripts" in md and "expected answer:" in md and "Retrieval" not in md
    data = json.loads((out / "report.json").read_text())
    assert [b["key"] for b in data["blocks"]] == ["family"]
    assert len(data["outcomes"]) == 2 * 4  # N=1, N=2, truncation, full attention
    assert all(o["revive_equal"] for o in data["outcomes"])


def test_tiny_demo_writes_report(suite: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    args = [
        "demo",
        "--checkpoints",
        str(suite),
        "--out",
        str(out),
        "--kinds",
        "retrieval,math_last",
        "--episodes",
        "1",
        "--math-episodes",
        "1",
        "--no-progress",
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "Retrieval" in res.output and "Math" in res.output and "revived runs equal" in res.output
    md = (out / "report.md").read_text()
    assert "agentsleep demo --checkpoints" in md and "## Summary" in md and "exact sign test" in md
    for row in ("sleep N=1", "sleep N=2", "window truncation", "full attention, whole episode"):
        assert row in md  # the tiny suite ships an attention-only Depo model whose window holds an episode
    for png in ("report_retrieval.png", "report_math_last.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    data = json.loads((out / "report.json").read_text())
    assert {b["key"] for b in data["blocks"]} == {"retrieval", "math_last"}
    outcomes = data["outcomes"]
    assert len(outcomes) == 4 + 3  # retrieval: N=1, N=2, truncation, full attention; math: the first three
    assert all(o["killed_at"] is not None and o["revive_equal"] for o in outcomes)


def test_demo_without_checkpoints_says_what_to_do(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["demo", "--checkpoints", str(tmp_path), "--no-progress"])
    assert res.exit_code != 0 and "no trained checkpoints" in res.output
