# -*- test-case-name: tests.test_cli_progress -*-
"""
The progress bar of C{push} and C{pull}: bytes, rate and time left, drawn
by U{tqdm<https://tqdm.github.io/>} on standard error when it is a
terminal, and nothing at all when it is not (a log, a pipe, CI).
"""

from __future__ import annotations

from typing import Any, TextIO

from tqdm import tqdm

# No monitor thread: the bar is only ever updated from the reactor thread.
tqdm.monitor_interval = 0


#: push:  42%|####      | 12.6MB/30.0MB [00:01<00:01, 11.2MB/s]
_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}]"


def wantsBar(stream: Any) -> bool:
    """Draw a bar on C{stream}? Only on a terminal."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # closed
        return False


class ProgressBar:
    """
    A byte count towards C{total}: L{update} moves it (backwards too: a
    link that starts over sends again), L{close} leaves the final line.
    Disabled, every method does nothing.
    """

    def __init__(self, total: int, label: str, stream: TextIO, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: tqdm[Any] | None = None
        if enabled:
            self._bar = tqdm(
                total=total,
                desc=label,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                file=stream,
                dynamic_ncols=True,
                mininterval=0.2,
                leave=True,
                bar_format=_FORMAT,
            )

    def update(self, done: int) -> None:
        """C{done} bytes of the total have moved."""
        bar = self._bar
        if bar is not None and done != bar.n:
            bar.update(done - bar.n)

    def advance(self, count: int) -> None:
        """C{count} more bytes moved."""
        if self._bar is not None and count:
            self._bar.update(count)

    def close(self) -> None:
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.close()


class AroundBars:
    """
    A text stream (for log lines) that writes around any bar on the
    terminal, so that neither garbles the other.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        tqdm.write(text, file=self.stream, end="")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
