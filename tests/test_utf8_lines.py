"""non_utf8_line names the first line holding bytes that are not UTF-8, whatever the chunking."""

from __future__ import annotations

import pytest

from datamodules import utf8_lines
from datamodules.utf8_lines import non_utf8_line

LINES = [b"\xef\xbb\xbfheader,a", "caf\u00e9,\u4e2d\u6587".encode(), b"plain,1", b"x,y"]


def _naive(lines: list[bytes]) -> str | None:
    """The same answer, one line at a time."""
    for number, line in enumerate(lines, start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as err:
            return (f"line {number} is not UTF-8 text "
                    f"(byte 0x{line[err.start]:02x} at position {err.start + 1} of the line)")
    return None


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 20])
@pytest.mark.parametrize("bad", [None, (0, 1), (1, 4), (2, 0), (3, 2)])
def test_first_bad_line_and_position(tmp_path, monkeypatch, chunk, bad):
    lines = list(LINES)
    if bad is not None:
        line, at = bad
        lines[line] = lines[line][:at] + b"\xff" + lines[line][at:]
    path = tmp_path / "file.csv"
    path.write_bytes(b"\n".join(lines))
    monkeypatch.setattr(utf8_lines, "_CHUNK_BYTES", chunk)
    assert non_utf8_line(path) == _naive(lines)
    if bad is not None:
        assert non_utf8_line(path).startswith(f"line {bad[0] + 1} ")
