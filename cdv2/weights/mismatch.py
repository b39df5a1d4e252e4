"""The one error for "these weights do not fit the model": every missing, unexpected and
mis-shaped key in one message (and in attributes, for tools and tests)."""
from __future__ import annotations

from typing import Mapping

_LIST_LIMIT = 40  # entries shown per category in an error message (the exception keeps them all)


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model. `missing`: [(name, expected shape)]; `unexpected`:
    [(name, shape)]; `misshaped`: [(name, expected shape, got shape)]; `problems`: [str];
    `hint`: a last line with a suggestion (e.g. which --config fits)."""

    def __init__(self, source, missing=(), unexpected=(), misshaped=(), problems=(), hint: str = ""):
        self.source, self.missing, self.unexpected = str(source), list(missing), list(unexpected)
        self.misshaped, self.problems, self.hint = list(misshaped), list(problems), hint
        super().__init__(self._message())

    def with_hint(self, hint: str) -> "CheckpointMismatchError":
        return CheckpointMismatchError(self.source, self.missing, self.unexpected, self.misshaped,
                                       self.problems, hint)

    def _message(self) -> str:
        n = len(self.missing) + len(self.unexpected) + len(self.misshaped) + len(self.problems)
        lines = [f"{self.source} does not match the model ({n} problem{'s' * (n != 1)}):"]

        def section(title, rows):
            if rows:
                lines.append(f"  {title} ({len(rows)}):")
                lines.extend(f"    {r}" for r in rows[:_LIST_LIMIT])
                if len(rows) > _LIST_LIMIT:
                    lines.append(f"    ... and {len(rows) - _LIST_LIMIT} more")

        section("missing", [f"{k}  expected {list(s)}" for k, s in self.missing])
        section("unexpected", [f"{k}  {list(s)}" for k, s in self.unexpected])
        section("mis-shaped", [f"{k}  expected {list(e)}, got {list(g)}" for k, e, g in self.misshaped])
        section("other", self.problems)
        if self.hint:
            lines.append(self.hint)
        return "\n".join(lines)


def raise_if_mismatched(source, want: Mapping[str, tuple], got: Mapping[str, tuple]) -> None:
    """Compare {name: shape} dicts; raise one CheckpointMismatchError listing every difference."""
    missing = [(k, s) for k, s in want.items() if k not in got]
    unexpected = [(k, s) for k, s in got.items() if k not in want]
    misshaped = [(k, want[k], s) for k, s in got.items() if k in want and want[k] != s]
    if missing or unexpected or misshaped:
        raise CheckpointMismatchError(source, missing, unexpected, misshaped)
