"""Progress of long commands on stderr: a bar on a terminal, otherwise a plain line every
few seconds or every so many records; ``--quiet`` turns it off. Stdout carries only the
report. And the signal handling those commands share: the first SIGINT/SIGTERM finishes the
batch in hand, a second stops at once."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Iterator
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)


class ProgressDisplay:
    """Progress on stderr: a rich bar on a terminal, else a line every ``every_s`` seconds or
    every ``every_n`` items. Quiet: nothing."""

    def __init__(
        self,
        *,
        quiet: bool,
        every_s: float | None = None,
        every_n: int | None = None,
    ) -> None:
        self.enabled = not quiet
        self.tty = self.enabled and sys.stderr.isatty()
        self.every_s = every_s
        self.every_n = every_n
        self.bar: Progress | None = None
        self.task: TaskID | None = None
        self.phase = ""
        self.phase_started = time.monotonic()
        self.last_time = time.monotonic()
        self.last_done = 0
        self.printed = False
        self.latest: tuple[int, int | None, str] = (0, None, "")

    def __enter__(self) -> ProgressDisplay:
        if self.tty:
            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.bar.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif exc_type is None:
            self._flush()

    def update(self, phase: str, done: int, total: int | None, detail: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if phase != self.phase:
            self._flush()
            if self.bar is not None and self.task is not None:
                # The phase before is over: show it complete, also when its total was unknown.
                self.bar.update(self.task, total=self.latest[0], completed=self.latest[0])
            self.phase, self.phase_started = phase, now
            self.last_time, self.last_done, self.printed = now, 0, False
            if self.bar is not None:
                self.task = self.bar.add_task(phase, total=total, detail=detail)
        self.latest = (done, total, detail)
        if self.bar is not None:
            assert self.task is not None
            self.bar.update(self.task, completed=done, total=total, detail=detail)
            return
        due_n = self.every_n is not None and done - self.last_done >= self.every_n
        due_s = self.every_s is not None and now - self.last_time >= self.every_s
        if due_n or due_s:
            self._line(now)

    def _flush(self) -> None:
        """The last count of a phase that printed lines, unless it was the last line."""
        if self.bar is None and self.printed and self.latest[0] != self.last_done:
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        done, total, detail = self.latest
        self.last_time, self.last_done, self.printed = now, done, True
        rate = done / max(now - self.phase_started, 1e-9)
        of = f"/{total:,}" if total is not None else ""
        share = f" ({100 * done // total}%)" if total else ""
        extra = f", {detail}" if detail else ""
        print(
            f"{self.phase}: {done:,}{of} records{share}, {rate:,.0f}/s{extra}",
            file=sys.stderr,
            flush=True,
        )


@contextlib.contextmanager
def stop_on_signals(stopping: asyncio.Event) -> Iterator[None]:
    """First SIGINT/SIGTERM: finish the batch in hand and stop; a second: stop at once."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stopping.is_set():
            loop.remove_signal_handler(signum)
            signal.raise_signal(signum)
            return
        print(
            "chargeline: stopping after the batch in hand (again to stop at once)",
            file=sys.stderr,
        )
        stopping.set()

    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, on_signal, signum)
            installed.append(signum)
    try:
        yield
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
