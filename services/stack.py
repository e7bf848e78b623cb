"""`stepaudio2 up`: the whole local stack in the foreground (issue 3)."""
from __future__ import annotations


def register(sub) -> None:
    """Add this module's subcommands to the `stepaudio2` argument parser."""
