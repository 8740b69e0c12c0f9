"""The one place the CLI makes its rich consoles.

Off a terminal (a pipe, a batch job's log file) rich would wrap every line at 80 columns and cut table cells with
"…": logs are read with grep and less, so there a console never wraps or crops a line. Its width is wider than any
line nps prints (tables take the width their cells need, never more: ``expand`` is off everywhere) and soft wrapping
keeps text, table titles and captions on one line each.
"""
from __future__ import annotations

from rich.console import Console

LOG_WIDTH = 10_000  # off a terminal: wider than any table or line nps prints, so nothing wraps or is cut


def make_console() -> Console:
    """The console of a command: rich's own on a terminal; off a terminal one that never wraps or cuts a line."""
    console = Console()
    if console.is_terminal:
        return console
    return Console(width=LOG_WIDTH, soft_wrap=True)

