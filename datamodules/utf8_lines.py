"""The line where a text file stops being UTF-8.

Why: polars fails on such bytes with "invalid utf8" and no position, and a 26M-line file cannot
be searched by eye. Only called once a read has failed, so a clean file is never read twice.
"""

from __future__ import annotations

from pathlib import Path

_CHUNK_BYTES = 1 << 24


def non_utf8_line(path: Path) -> str | None:
    """`line N is not UTF-8 text (byte 0x.. at position P of the line)` for the first bytes
    of `path` that do not decode, or None if the whole file is UTF-8."""
    line = 1
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            chunk += f.readline()  # end on a line break, which never sits inside a character
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError as err:
                before = chunk[:err.start]
                bad_line = line + before.count(b"\n")
                position = err.start - before.rfind(b"\n")  # 1-based; rfind is -1 on line 1
                return (f"line {bad_line} is not UTF-8 text "
                        f"(byte 0x{chunk[err.start]:02x} at position {position} of the line)")
            line += chunk.count(b"\n")
    return None
