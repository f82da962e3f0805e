"""The `agentsleep` command. Each layer contributes its own click group; this file only mounts them."""

from __future__ import annotations

import importlib
import logging

import click

# (command name, "module:attribute") — imported lazily so `agentsleep --help` stays fast and a missing
# optional dependency (e.g. vLLM) only breaks the command that needs it.
_COMMANDS: dict[str, str] = {
    "demo": "agentsleep.episodes.cli:demo",
    "eval": "agentsleep.train.eval_cli:eval_checkpoint",
    "snapshots": "agentsleep.store.cli:snapshots",
    "serve": "agentsleep.serving.cli:serve",
    "sleep-worker": "agentsleep.memory.worker_cli:sleep_worker",
    "train": "agentsleep.train.cli:train",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="agentsleep")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """agentsleep: a memory layer for long-running agents ("LLM sleep")."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


if __name__ == "__main__":
    main()
