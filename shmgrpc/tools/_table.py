"""The one text table of the tools: `shmgrpc ls` and `shmgrpc doctor`, the
bench's reports, the loop-stall check and the demo client all print theirs
with format_table()."""

from __future__ import annotations

from typing import List, Sequence


def format_table(rows: Sequence[Sequence[str]], align: str = "", indent: str = "", gap: str = "  ",
                 minimum: Sequence[int] = ()) -> List[str]:
    """One line per row (a header is a row like the others). Each column
    is as wide as its widest cell, or minimum[i] if wider, and its cells
    are aligned as align[i] says, '<' left or '>' right; columns past the
    end of `align` are right-aligned (numbers line up). Lines carry no
    trailing spaces, so a last column of free text, aligned left, may be
    as long as it likes."""
    count = max((len(row) for row in rows), default=0)
    widths = [max([len(row[i]) for row in rows if i < len(row)] + list(minimum[i:i + 1])) for i in range(count)]
    sides = align.ljust(count, ">")
    return [
        (indent + gap.join(cell.ljust(width) if side == "<" else cell.rjust(width)
                           for cell, width, side in zip(row, widths, sides))).rstrip()
        for row in rows
    ]


__all__ = ["format_table"]
