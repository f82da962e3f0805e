"""Long-horizon agent episodes: facts over many turns, sleeps, a SIGKILL and a revive, questions at the end.

    from agentsleep.episodes import Condition, depo_episodes, run_condition
    episodes = depo_episodes(task_config, n=8, seed=0)                  # pure data, in the model's token language
    outcomes = run_condition(episodes, Condition(name="sleep N=4", checkpoint="checkpoints/depo-micro-n4"),
                             "agentsleep.episodes.drivers:host_driver", Path("runs/episodes/x"))

The same episode objects run through the embedded AgentHost driver here and through the LangChain driver in
``evals/episodes``. ``agentsleep demo`` is `agentsleep.episodes.cli`. See docs/episodes.md.
"""

from agentsleep.episodes.build import depo_episodes, gsm_episodes, stateful_gsm_episodes
from agentsleep.episodes.drivers import Condition, Driver, HostDriver, TruncatingEngine, host_driver
from agentsleep.episodes.harness import Grader, kill_turns, run_chain, run_condition
from agentsleep.episodes.types import Episode, EpisodeOutcome, Question, QuestionOutcome, Turn, wilson

__all__ = [
    "Condition",
    "Driver",
    "Episode",
    "EpisodeOutcome",
    "Grader",
    "HostDriver",
    "Question",
    "QuestionOutcome",
    "TruncatingEngine",
    "Turn",
    "depo_episodes",
    "gsm_episodes",
    "host_driver",
    "kill_turns",
    "run_chain",
    "run_condition",
    "stateful_gsm_episodes",
    "wilson",
]
