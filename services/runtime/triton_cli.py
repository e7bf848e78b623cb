"""`stepaudio2 triton` and `stepaudio2 model-repo ...` subcommands (issue 3)."""
from __future__ import annotations


def register(sub) -> None:
    """Add this module's subcommands to the `stepaudio2` argument parser."""
