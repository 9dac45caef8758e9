"""The demo's terminal: event lines, and a status line redrawn in place on a terminal."""

from __future__ import annotations

import shutil
from typing import TextIO


class Console:
    """Event lines, and a status line redrawn in place on a terminal (plain lines otherwise)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._status = ""

    def line(self, text: str = "") -> None:
        if self._status:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        if self._status:
            self.stream.write(self._status)
        self.stream.flush()

    def status(self, text: str) -> None:
        if not self.tty:
            self.line(text)
            return
        width = max(20, shutil.get_terminal_size((100, 24)).columns - 1)
        self._status = text[:width]
        self.stream.write("\r\x1b[K" + self._status)
        self.stream.flush()

    def keep_status(self) -> None:
        """Leave the status line on screen as an ordinary line."""
        if self._status:
            self.stream.write("\n")
            self.stream.flush()
            self._status = ""


def format_ms(seconds: float | None) -> str:
    """Milliseconds, to one decimal below 100 ms; "-" for nothing."""
    if seconds is None:
        return "-"
    ms = seconds * 1000
    return f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"
