"""What imgcls writes to a terminal: plain lines (:func:`say`) whose control characters are shown, never obeyed.

File and class names come from the user's data, and a name may hold ANSI
escape sequences (``\\x1b[2J`` clears the screen; others retitle the window or
fake earlier output).  Every line imgcls prints goes through :func:`safe`,
which writes each control character (C0 but newline and tab, DEL, C1) as a
``\\xNN`` escape, as the HTML report escapes markup.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def safe(text: str) -> str:
    """``text`` with its control characters written as ``\\xNN`` (newlines and tabs kept)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def console(quiet: bool = False, **options):
    """A rich Console (no markup highlighting) whose ``print`` shows control characters in strings as escapes."""
    from rich.console import Console

    class SafeConsole(Console):
        def print(self, *objects, **kwargs):
            return super().print(*(safe(o) if isinstance(o, str) else o for o in objects), **kwargs)

    return SafeConsole(quiet=quiet, highlight=False, **options)


def say(console, line: str) -> None:
    """Print ``line`` on ``console`` as it is: no markup, no highlighting, long lines wrapped by the terminal
    (not cut), so that a path or a figure is never restyled or split."""
    console.print(line, highlight=False, markup=False, soft_wrap=True)
