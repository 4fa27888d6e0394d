"""Argument normalisation shared by the entry points: each error names the argument."""

from __future__ import annotations


def as_list(value, argname: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        if not value:
            raise ValueError(f"{argname} is an empty list")
        return list(value)
    raise TypeError(f"{argname} must be a string or a list of strings, not {type(value).__name__}")


def broadcast(values: list, batch: int, argname: str) -> list:
    if len(values) == batch:
        return values
    if len(values) == 1:
        return values * batch
    raise ValueError(f"{argname} has {len(values)} entries but there are {batch} prompts (give 1 or {batch})")
