"""Running episodes end to end: once uninterrupted, and once with the agent's process SIGKILLed at a random turn of
every episode and a fresh process reviving it from the store — the two must give the same replies.

A run is a chain of child processes. Each child builds a driver (engine + store + …) and plays episodes in order,
appending one JSON line per turn to ``turns.jsonl``. At an episode's kill turn the child writes a kill record and
waits (a background sleep may be running); the parent SIGKILLs it after a short random delay and starts a fresh child
that revives that episode's agent from the store and goes on from the next turn.

Children come from a multiprocessing **fork server** (``mode="forkserver"``, the default): a clean process that
imported the stack once and never ran a model, opened a store or held an agent; each child is forked from it, so it
shares nothing with the child before it yet starts in milliseconds, and forking never copies the parent's threads.
``mode="spawn"`` starts a fresh interpreter per child instead (``python -m agentsleep.episodes.worker SPEC``), which
costs an interpreter start per child (9–14 s measured on the loaded 2-core box, docs/episodes.md). Either way the
driver factory must be importable (a module-level ``module:function``), and a script that runs episodes must guard its
entry point with ``if __name__ == "__main__":`` (the fork server imports the main module, as multiprocessing does).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agentsleep.episodes.drivers import Condition, Driver
from agentsleep.episodes.types import ENGLISH_KINDS, Episode, EpisodeOutcome, QuestionOutcome
from agentsleep.errors import AgentSleepError, InvalidInput

logger = logging.getLogger(__name__)

DriverFactory = Callable[[Condition, Path], Driver]
Mode = Literal["forkserver", "spawn"]
TURNS_FILE = "turns.jsonl"
_KILL_DELAY_S = (0.0, 0.05)  # SIGKILL lands 0–50 ms after the kill turn: before, during or after its background sleep


class EpisodeError(AgentSleepError):
    """A child process failed (not by our SIGKILL)."""


# --------------------------------------------------------------------------------------------------- child side


def resolve_factory(ref: str | DriverFactory) -> DriverFactory:
    """``"package.module:function"`` -> the function (a callable is returned as is)."""
    if callable(ref):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


def play_segment(
    factory: str | DriverFactory,
    condition: Condition,
    workdir: Path,
    episodes: Sequence[Episode],
    start: tuple[int, int],
    kills: dict[str, int],
    out: Path,
) -> None:
    """Child body: play ``episodes`` from (episode index, turn) ``start`` on, logging every turn to ``out``."""
    import torch

    torch.set_num_threads(1)  # one thread per process was the stable setting on 2 shared cores (DESIGN.md)
    torch.set_flush_denormal(True)
    with open(out, "a") as log:

        def write(row: dict[str, Any]) -> None:
            log.write(json.dumps(row) + "\n")
            log.flush()

        try:
            driver = resolve_factory(factory)(condition, workdir)
            first_ep, first_turn = start
            for e in range(first_ep, len(episodes)):
                ep = episodes[e]
                t0 = time.perf_counter()
                first = first_turn if e == first_ep else 0
                driver.begin(ep, resume=first > 0)
                for t in range(first, len(ep.turns)):
                    reply = driver.turn(ep, ep.turns[t])
                    write({"e": e, "t": t, "reply": list(reply)})
                    if kills.get(ep.id) == t:
                        write({"e": e, "t": t, "kill": True, "in_flight": driver.in_flight(ep)})
                        while True:  # the parent SIGKILLs us here; background sleeps keep running meanwhile
                            time.sleep(1.0)
                    driver.settle(ep)
                write({"e": e, "done": True, "sleeps": driver.sleeps(ep), "seconds": time.perf_counter() - t0})
                driver.finish(ep)
            driver.close()
        except BaseException as exc:
            write({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
            raise


# --------------------------------------------------------------------------------------------------- parent side


_PRELOAD = ["agentsleep.episodes.harness", "agentsleep.episodes.drivers"]


def preload(*modules: str) -> None:
    """Have the fork server import these modules once (e.g. another driver's), if it has not started yet."""
    _PRELOAD.extend(m for m in modules if m not in _PRELOAD)


def _forkserver(factory: str | DriverFactory) -> Any:
    """The fork-server context, preloading the episode machinery and the driver's module (import once, fork often).

    The server starts with the first child of this process; preloads named after that are imported per child.
    """
    preload(factory.partition(":")[0] if isinstance(factory, str) else factory.__module__)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(_PRELOAD))
    return ctx


class _Child:
    """A child from the fork server or a fresh interpreter, behind one small interface."""

    def __init__(self, mode: Mode, args: tuple[Any, ...], spec_path: Path | None) -> None:
        self.mode = mode
        if mode == "forkserver":
            self.proc: Any = _forkserver(args[0]).Process(target=play_segment, args=args, daemon=True)
            self.proc.start()
        else:
            assert spec_path is not None
            self._stderr = open(spec_path.with_suffix(".stderr"), "a")  # closed in wait()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agentsleep.episodes.worker", str(spec_path)],
                cwd=os.getcwd(),  # `python -m` puts it on sys.path, so a factory under evals/ imports too
                stdout=subprocess.DEVNULL,
                stderr=self._stderr,
            )

    def alive(self) -> bool:
        return self.proc.is_alive() if self.mode == "forkserver" else self.proc.poll() is None

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL in both cases
        self.wait()

    def wait(self) -> int:
        if self.mode == "forkserver":
            self.proc.join()
            return int(self.proc.exitcode)
        code = int(self.proc.wait())
        self._stderr.close()
        return code


@dataclass
class ChainResult:
    """Everything a chain of child processes logged, per episode."""

    replies: dict[int, dict[int, list[int]]] = field(default_factory=dict)  # episode -> turn -> reply
    done: dict[int, dict[str, Any]] = field(default_factory=dict)  # episode -> {"sleeps", "seconds"}
    killed_at: dict[int, int] = field(default_factory=dict)
    in_flight: dict[int, bool] = field(default_factory=dict)  # a background sleep was scheduled or running at the kill
    processes: int = 0


def _read_new(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    if not path.exists():
        return [], offset
    with open(path) as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind("\n") + 1  # only complete lines
    rows = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return rows, offset + end


def run_chain(
    episodes: Sequence[Episode],
    condition: Condition,
    factory: str | DriverFactory,
    workdir: Path,
    *,
    kills: dict[str, int] | None = None,
    mode: Mode = "forkserver",
    seed: int = 0,
    on_turn: Callable[[], None] | None = None,
) -> ChainResult:
    """Play every episode in child processes, SIGKILLing at each episode's kill turn and reviving in a fresh child.

    ``workdir`` is emptied first (stores, checkpointer, logs).
    """
    if mode == "spawn" and not isinstance(factory, str):
        raise InvalidInput("mode='spawn' needs the driver factory as an importable 'module:function' string")
    kills = dict(kills or {})
    by_id = {ep.id: i for i, ep in enumerate(episodes)}
    for ep_id, t in kills.items():
        if not 0 <= t < len(episodes[by_id[ep_id]].turns) - 1:
            raise InvalidInput(f"kill turn {t} of {ep_id} must leave at least one turn to play after the revive")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    out = workdir / TURNS_FILE
    spec_path = None
    if mode == "spawn":
        from agentsleep.episodes.worker import write_spec

        spec_path = write_spec(workdir, factory, condition, episodes, kills, out)  # type: ignore[arg-type]
    rng = np.random.default_rng([seed, 0xC0FFEE])
    result = ChainResult()
    start, offset = (0, 0), 0
    while True:
        args = (factory, condition, workdir, list(episodes), start, kills, out)
        if spec_path is not None:
            spec = json.loads(spec_path.read_text())
            spec_path.write_text(json.dumps({**spec, "start": list(start)}))
        child = _Child(mode, args, spec_path)
        result.processes += 1
        killed: tuple[int, int] | None = None
        while True:
            rows, offset = _read_new(out, offset)
            for row in rows:
                if "error" in row:
                    child.kill() if child.alive() else child.wait()
                    raise EpisodeError(f"{condition.name}: a child failed: {row['error']}\n{row['traceback']}")
                if row.get("kill"):
                    killed = (row["e"], row["t"])
                    result.in_flight[row["e"]] = bool(row["in_flight"])
                elif row.get("done"):
                    result.done[row["e"]] = {"sleeps": row["sleeps"], "seconds": row["seconds"]}
                elif "reply" in row:
                    result.replies.setdefault(row["e"], {})[row["t"]] = row["reply"]
                    if on_turn is not None:
                        on_turn()
            if killed is not None:
                time.sleep(float(rng.uniform(*_KILL_DELAY_S)))
                child.kill()
                break
            if not child.alive():
                rows, offset = _read_new(out, offset)
                if rows:
                    continue  # drain what it wrote last, then look again
                code = child.wait()
                if code != 0:
                    raise EpisodeError(f"{condition.name}: a child exited with code {code} (see {workdir})")
                break
            time.sleep(0.005)
        if killed is None:
            break
        result.killed_at[killed[0]] = killed[1]
        start = (killed[0], killed[1] + 1)
    missing = [episodes[i].id for i in range(len(episodes)) if i not in result.done]
    if missing:
        raise EpisodeError(f"{condition.name}: episodes never finished: {missing[:5]}")
    return result


def threshold_turns(episode: Episode, window: int, soft_threshold: float) -> list[int]:
    """Fact turns after which the window reaches the soft threshold, i.e. a background sleep starts (the sleep rules
    of `agentsleep.episodes.drivers`, simulated; facts only, since a reply's length is not known in advance)."""
    limit = max(1, math.ceil(round(soft_threshold * window, 9)))
    w, out = 0, []
    for i, t in enumerate(episode.turns):
        if t.reply:
            break
        if w and (t.sleep_before or w + len(t.ids) + episode.reserve > window):
            w = 0
        w += len(t.ids)
        if w >= limit:
            out.append(i)
            w = 0
    return out


def kill_turns(
    episodes: Sequence[Episode], seed: int, *, window: int | None = None, soft_threshold: float = 0.8
) -> dict[str, int]:
    """A seeded random kill turn per episode, never the last (something must be left to revive for).

    With ``window``, half the episodes (at random) are killed right after a turn that starts a background sleep, so
    the kill lands while that sleep is scheduled or running — the interesting case; the others anywhere.
    """
    rng = np.random.default_rng([seed, 0xDEAD])
    out = {}
    for ep in episodes:
        anywhere = int(rng.integers(0, len(ep.turns) - 1))
        hot = threshold_turns(ep, window, soft_threshold) if window else []
        pick = int(rng.integers(0, len(hot))) if hot else 0
        out[ep.id] = hot[pick] if hot and rng.random() < 0.5 else anywhere
    return out


# --------------------------------------------------------------------------------------------------- grading


class Grader:
    """Turns replies into graded questions: exact token match, or reasoning-gym's own scorer for its episodes (the
    English ones are graded on the decoded, readable answer)."""

    def __init__(self, tokenizer_path: str | Path) -> None:
        from tokenizers import Tokenizer

        p = Path(tokenizer_path)
        self.tokenizer = Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))
        self._gyms: dict[tuple[int, int], Any] = {}

    def text(self, ids: Sequence[int]) -> str:
        return " ".join(self.tokenizer.id_to_token(int(i)) or "?" for i in ids)

    def number(self, ids: Sequence[int]) -> str:
        """Digits and sign of a reply before its stop, joined (``- 1 2 <eos>`` -> ``-12``)."""
        out = []
        for i in ids:
            s = self.tokenizer.id_to_token(int(i)) or ""
            if s.startswith("<"):
                break
            if s.isdigit() or s == "-":
                out.append(s)
        return "".join(out)

    def grade(self, episode: Episode, replies: Sequence[Sequence[int]]) -> list[QuestionOutcome]:
        correct = episode.grade(replies)
        outs = []
        for turn, reply in zip(episode.turns, replies):
            if turn.question is None:
                continue
            q = episode.questions[turn.question]
            answer = episode.answer_of(reply)
            ok = correct[turn.question]
            said = self.text(answer)
            if episode.kind == "stateful_gsm":
                said = self.number(answer)
                ok = self._gym_score(episode, said) == 1.0  # reasoning-gym's scorer, not ours
            elif episode.kind in ENGLISH_KINDS:
                from agentsleep.episodes.build import english_score

                body = [int(t) for t in answer if t not in episode.stop_ids]
                said = self.tokenizer.decode(body, skip_special_tokens=False)
                ok = english_score(episode, said) == 1.0
            outs.append(QuestionOutcome(group=q.group, correct=ok, answer=said, expected=q.answer))
        return outs

    def _gym_score(self, episode: Episode, answer: str) -> float:
        from agentsleep.tasks.stateful_gsm import StatefulGSM

        key = (int(episode.meta["rg_size"]), int(episode.meta["seed"]))
        if key not in self._gyms:
            self._gyms[key] = StatefulGSM(size=key[0], seed=key[1])
        gym = self._gyms[key]
        ep = next(e for e in gym.episodes if e.index == episode.meta["rg_index"])
        return float(gym.score(ep, answer or None))


def run_condition(
    episodes: Sequence[Episode],
    condition: Condition,
    factory: str | DriverFactory,
    workdir: Path,
    *,
    seed: int = 0,
    kill: bool = True,
    mode: Mode = "forkserver",
    on_turn: Callable[[], None] | None = None,
) -> list[EpisodeOutcome]:
    """Every episode under one condition: uninterrupted, then (``kill``) killed and revived; graded outcomes.

    The outcome's replies are the killed-and-revived run's; ``revive_equal`` says whether they equal the
    uninterrupted run's, turn for turn.
    """
    full = run_chain(episodes, condition, factory, workdir / "uninterrupted", mode=mode, seed=seed, on_turn=on_turn)
    chain = full
    if kill:
        window = None if condition.full_history else _window_of(condition.checkpoint)
        kills = kill_turns(episodes, seed, window=window, soft_threshold=condition.soft_threshold)
        chain = run_chain(
            episodes, condition, factory, workdir / "killed", kills=kills, mode=mode, seed=seed, on_turn=on_turn
        )
    grader = Grader(condition.checkpoint)
    outcomes = []
    for i, ep in enumerate(episodes):
        replies = [chain.replies[i][t] for t in range(len(ep.turns))]
        base = [full.replies[i][t] for t in range(len(ep.turns))]
        outcomes.append(
            EpisodeOutcome(
                episode=ep.id,
                condition=condition.name,
                replies=replies,
                questions=grader.grade(ep, replies),
                sleeps=int(chain.done[i]["sleeps"]),
                killed_at=chain.killed_at.get(i) if kill else None,
                killed_in_flight=chain.in_flight.get(i) if kill else None,
                revive_equal=(replies == base) if kill else None,
                seconds=float(full.done[i]["seconds"]),
            )
        )
    return outcomes


def _window_of(checkpoint: str) -> int:
    return int(json.loads((Path(checkpoint) / "config.json").read_text())["window"])


__all__ = [
    "ChainResult",
    "DriverFactory",
    "EpisodeError",
    "Grader",
    "Mode",
    "kill_turns",
    "play_segment",
    "preload",
    "resolve_factory",
    "run_chain",
    "run_condition",
    "threshold_turns",
]
