"""Counts in user-facing text: "1 image", "2 images"."""

from __future__ import annotations


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """`n` and the noun that agrees with it; `nouns` for irregular plurals (default: noun + "s")."""
    return f"{n} {noun if n == 1 else (nouns or noun + 's')}"
