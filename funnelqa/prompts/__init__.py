"""Prompts live as text files beside this module so they can be read and changed without code."""

from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def load(name: str) -> str:
    """The text of ``prompts/NAME.txt`` (UTF-8, stripped), read once per process. Raises
    FileNotFoundError for a name with no file."""
    return files(__name__).joinpath(f"{name}.txt").read_text(encoding="utf-8").strip()
