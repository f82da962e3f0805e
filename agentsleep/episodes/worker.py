"""``python -m agentsleep.episodes.worker SPEC``: one child of an episode run in a fresh interpreter.

SPEC is a JSON file the parent writes (`write_spec`): the driver factory (``"module:function"``), the condition, the
episodes, the kill turns, where to log, and where to start (episode index, turn; a start turn > 0 means "revive").
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from agentsleep.episodes.drivers import Condition
from agentsleep.episodes.harness import play_segment
from agentsleep.episodes.types import Episode


def write_spec(
    workdir: Path, factory: str, condition: Condition, episodes: Sequence[Episode], kills: dict[str, int], out: Path
) -> Path:
    path = workdir / "spec.json"
    spec = {
        "factory": factory,
        "condition": condition.model_dump(mode="json"),
        "episodes": [ep.model_dump(mode="json") for ep in episodes],
        "kills": kills,
        "out": str(out),
        "workdir": str(workdir),
        "start": [0, 0],
    }
    path.write_text(json.dumps(spec))
    return path


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m agentsleep.episodes.worker SPEC.json")
    spec = json.loads(Path(args[0]).read_text())
    play_segment(
        spec["factory"],
        Condition.model_validate(spec["condition"]),
        Path(spec["workdir"]),
        [Episode.model_validate(e) for e in spec["episodes"]],
        (int(spec["start"][0]), int(spec["start"][1])),
        {k: int(v) for k, v in spec["kills"].items()},
        Path(spec["out"]),
    )


if __name__ == "__main__":
    main()
