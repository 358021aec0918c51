"""Counts in messages: "1 epoch", "2 epochs" (a message with "(1 epochs, ...)" reads as a bug)."""
from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """`n` and the word in the number it takes: plural(1, "epoch") -> "1 epoch"; plural(3, "class", "classes")."""
    return f"{n:,} {word if n == 1 else many or word + 's'}"
