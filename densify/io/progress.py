"""Progress for long runs: a rich bar on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("densify")


class Progress:
    def __init__(self, total_images: int, *, enabled: bool = True, every_s: float = 10.0, label: str = "images"):
        self.total = total_images
        self.done = 0
        self.failed = 0
        self.queries = 0
        self.store_hits = 0
        self.t0 = time.perf_counter()
        self.every_s = every_s
        self._last_log = self.t0
        self.label = label
        self._bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn
            from rich.progress import Progress as RichProgress
            from rich.progress import TextColumn, TimeRemainingColumn
            self._bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), transient=False)
            self._task = self._bar.add_task(label, total=total_images, rate="")
            self._bar.start()
        self.enabled = enabled

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def qps(self) -> float:
        return self.queries / max(self.elapsed, 1e-9)

    def update(self, *, images: int = 1, queries: int = 0, failed: int = 0, store_hits: int = 0) -> None:
        self.done += images
        self.failed += failed
        self.queries += queries
        self.store_hits += store_hits
        rate = f"{self.qps():,.0f} q/s" + (f", {self.store_hits:,} stored" if self.store_hits else "") + \
               (f", {self.failed} failed" if self.failed else "")
        if self._bar is not None:
            self._bar.update(self._task, advance=images, rate=rate)
        elif self.enabled and (time.perf_counter() - self._last_log >= self.every_s or self.done == self.total):
            self._last_log = time.perf_counter()
            eta = (self.total - self.done) * self.elapsed / max(self.done, 1)
            log.info("%s %d/%d, %s, %.0f s elapsed, ETA %.0f s", self.label, self.done, self.total, rate,
                     self.elapsed, eta)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
