"""Prompts live as text files beside this module so they can be read and changed without code."""

from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def load(name: str) -> str:
    return files(__name__).joinpath(f"{name}.txt").read_text(encoding="utf-8").strip()
