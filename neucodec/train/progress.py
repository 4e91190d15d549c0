"""Progress of the training loops: a tqdm bar on a terminal, plain log lines otherwise.

Under nohup, a pipe or a log file the bar is off (its redraws would flood the log); the loops'
periodic JSON log lines, which carry the mean step time, are then the progress report.
"""
from __future__ import annotations

import sys

from tqdm import tqdm


def interactive() -> bool:
    """True when both stdout and stderr are terminals."""
    return all(f is not None and f.isatty() for f in (sys.stdout, sys.stderr))


def bar(total: int, initial: int, desc: str, enabled: bool | None = None) -> tqdm:
    """A step bar on stderr (rate, ETA, postfix); a no-op when `enabled` is False, or None and not `interactive()`."""
    on = interactive() if enabled is None else enabled
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, disable=not on)


def log_line(text: str) -> None:
    """Print a line on stdout, above the bar if there is one, and flush it (stdout may be a log file)."""
    tqdm.write(text)
    sys.stdout.flush()
