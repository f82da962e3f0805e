"""agentsleep: a memory layer for long-running LLM agents ("LLM sleep", arXiv 2605.26099).

Import the pieces from their layers: `agentsleep.model`, `agentsleep.store`, `agentsleep.runtime`,
`agentsleep.memory`, `agentsleep.serving`. This top level stays import-light on purpose.
"""

__version__ = "0.1.0"
