"""One progress helper for every long loop, so bars look and behave the same.

Where the output goes decides the form (FVTRUST_PROGRESS overrides it):

* a terminal: live tqdm bars (``FVTRUST_PROGRESS=bar`` forces them);
* anything else (a log file, a pipe, CI): one plain line per bar every
  FVTRUST_PROGRESS_INTERVAL seconds (default 30) while it runs, and one when
  it ends, so ``fvtrust reproduce > log 2>&1`` stays readable
  (``FVTRUST_PROGRESS=log`` forces this form on a terminal);
* ``FVTRUST_PROGRESS=0`` (or false/no/off) silences them.

Progress events (for fault-injection tests and external monitors): when
FVTRUST_EVENTS_FD names an open file descriptor, every bar step and every
:func:`event` writes one line ``KIND<TAB>DETAIL`` to it, whether or not the
bars are shown. A test can then SIGKILL the process at the k-th event of the
run's own progress instead of after a guessed sleep.
"""
from __future__ import annotations

import os
import re
import sys

from tqdm.auto import tqdm as _auto_tqdm
from tqdm.std import tqdm as _std_tqdm

_OFF = ("0", "false", "no", "off")
LOG_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]{postfix}"
LOG_FORMAT_NO_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}]{postfix}"


def enabled() -> bool:
    return os.environ.get("FVTRUST_PROGRESS", "1").strip().lower() not in _OFF


def mode(stream=None) -> str:
    """'off', 'bar' or 'log' for output to `stream` (default stderr), see the module doc."""
    env = os.environ.get("FVTRUST_PROGRESS", "").strip().lower()
    if env in _OFF:
        return "off"
    if env in ("bar", "log"):
        return env
    stream = sys.stderr if stream is None else stream
    try:
        return "bar" if stream.isatty() else "log"
    except (AttributeError, ValueError):  # closed or exotic streams
        return "log"


def log_interval() -> float:
    try:
        return max(0.1, float(os.environ.get("FVTRUST_PROGRESS_INTERVAL", "30")))
    except ValueError:
        return 30.0


# -- events ---------------------------------------------------------------------------------------------------

_events_fd: int | None = None
_events_checked = False


def _fd() -> int | None:
    global _events_fd, _events_checked
    if not _events_checked:
        _events_checked = True
        raw = os.environ.get("FVTRUST_EVENTS_FD")
        if raw:
            try:
                _events_fd = int(raw)
                os.fstat(_events_fd)
            except (ValueError, OSError):
                _events_fd = None
    return _events_fd


def event(kind: str, detail: str = "") -> None:
    """Report one progress event (a no-op unless FVTRUST_EVENTS_FD is set)."""
    fd = _fd()
    if fd is None:
        return
    line = f"{kind}\t{detail}".replace("\n", " ") + "\n"
    try:
        os.write(fd, line.encode())
    except OSError:  # the reader went away: stop reporting, keep working
        global _events_fd
        _events_fd = None


# -- bars -----------------------------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Lines:
    """A file-like for tqdm that turns its redraws (carriage returns, cursor moves) into whole lines."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str):
        s = _ANSI.sub("", s).replace("\r", "").strip()
        if s:
            self.stream.write(s + "\n")

    def flush(self):
        try:
            self.stream.flush()
        except (AttributeError, ValueError):
            pass


def _make(base):
    class Bar(base):
        """tqdm that reports events; in log mode it also prints a last line when it ends."""

        def __init__(self, *args, log_mode: bool = False, **kw):
            self._log_mode = log_mode
            self._desc_text = kw.get("desc") or ""
            super().__init__(*args, **kw)

        def update(self, n=1):
            event("progress", f"{self._desc_text}\t{n}")
            return super().update(n)

        def __iter__(self):
            for item in super().__iter__():
                yield item
                event("progress", f"{self._desc_text}\t1")

        def close(self):
            if self._log_mode and not self.disable and not getattr(self, "_closed_line", False):
                self._closed_line = True
                self.refresh()  # the final state, as one line
            return super().close()

    return Bar


_Bar = _make(_auto_tqdm)
_LogBar = _make(_std_tqdm)


def progress(iterable=None, *, total=None, desc=None, leave=False, unit="it", disable=None):
    """A progress bar on stderr (see the module doc); `disable=None` follows FVTRUST_PROGRESS."""
    m = mode()
    if disable is None:
        disable = m == "off"
    if m == "log" and not disable:
        interval = log_interval()
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        return _LogBar(iterable, total=total, desc=desc, leave=False, unit=unit, file=_Lines(sys.stderr),
                       mininterval=interval, maxinterval=interval, delay=min(interval, 5.0), miniters=1,
                       ascii=True, bar_format=LOG_FORMAT if total else LOG_FORMAT_NO_TOTAL, log_mode=True)
    return _Bar(iterable, total=total, desc=desc, leave=leave, unit=unit, disable=disable, dynamic_ncols=True)
