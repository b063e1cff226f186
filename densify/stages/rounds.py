"""The depth stage's round scheduler: images' engine batches through one engine stream.

A grid plan is one batch per image. With an adaptive plan every image asks its rounds one after another,
but images advance on their own (no lockstep across images): as soon as one round's answers are back,
that image plans its next round while the engine works on the other images' batches, and a finished
image makes room for the next. Rounds can be planned in this process's threads (the engine's loop goes on
feeding the engine meanwhile) or in Ray CPU tasks (the image's state travels there and back).
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
from collections import deque
from typing import Callable, Iterable, Iterator

from densify.engines import Engine, EngineBatch
from densify.fields.adaptive import AdaptiveDepthImage
from densify.queries.plan import QueryPlan

__all__ = ["RoundScheduler", "engine_stream", "plan_round"]


def engine_stream(engine: Engine, batches: Iterable, on_round: Callable[[int], None] | None = None):
    """(batch, completions) as the engine answers, reporting each round's size to `on_round`."""
    for batch, completions in engine.stream(batches):
        if on_round is not None:
            on_round(len(completions))
        yield batch, completions


def plan_round(state: AdaptiveDepthImage, completions):
    """An adaptive image takes a round's answers and plans its next round: (state, next batch or None)."""
    state.receive(completions)
    if any(c.error is not None for c in completions):
        state.done = True  # engine errors: no more rounds, the image fails when it is finished
    return state, state.next_batch()


class RoundScheduler:
    """Adaptive images through one engine stream, `width` images in flight (see the module docstring).

    start(first batch) -> the image's AdaptiveDepthImage (its first round already built: the batch itself).
    threads: plan each round in this thread pool (numpy, SciPy and OpenCV release the GIL for their work).
    plan_remote: plan each round in a Ray CPU task, not in this process.
    """

    def __init__(self, engine: Engine, width: int, start: Callable[[EngineBatch], AdaptiveDepthImage], *,
                 on_round: Callable[[int], None] | None = None, plan_remote: bool = False,
                 threads: cf.Executor | None = None):
        self.engine, self.width, self.start, self.on_round = engine, width, start, on_round
        self.queued: deque[EngineBatch] = deque()  # round batches ready for the engine
        self.finished: deque = deque()             # states whose image needs no more rounds
        self.firsts: dict[int, EngineBatch] = {}   # state.key -> the image's first batch (carries its task)
        self.planning: set = set()                 # plan_remote: ObjectRefs of rounds being planned
        self.threads = None if plan_remote else threads
        self.local: set = set()                    # threads: futures of rounds being planned
        self.active = 0
        self.exhausted = False
        self._serial = itertools.count()
        self._plan_remote = None
        if plan_remote:
            import ray

            self._plan_remote = ray.remote(num_cpus=1, max_retries=0)(plan_round)

    def run(self, batches: Iterable[EngineBatch]) -> Iterator[tuple[EngineBatch, list]]:
        """(first batch with its task, all completions) per image, as each finishes."""
        source = iter(batches)
        for b, completions in engine_stream(self.engine, self._feed(source), self.on_round):
            if self._plan_remote is not None:
                self.planning.add(self._plan_remote.remote(b.tag, completions))
            elif self.threads is not None:
                self.local.add(self.threads.submit(plan_round, b.tag, completions))
            else:
                self._place(*plan_round(b.tag, completions))
            yield from self._done()
        yield from self._done()

    def _feed(self, source: Iterator[EngineBatch]) -> Iterator[EngineBatch | None]:
        """The engine's input: round batches as they are ready, None while answers or plans are awaited."""
        while True:
            self._planned(0)
            while not self.exhausted and self.active < self.width:
                self._admit(next(source, None))
            if not self.queued and (self.planning or self.local):
                self._planned(0.005)  # the engine may hold nothing: wait a little for a planned round
            if self.queued:
                yield self.queued.popleft()
            elif self.exhausted and self.active == 0:
                return
            else:
                yield None  # nothing new yet: answers or planned rounds are on their way

    def _admit(self, batch: EngineBatch | None) -> None:
        if batch is None:
            self.exhausted = True
            return
        state = self.start(batch)
        state.key = next(self._serial)  # names the image across copies made by remote planning
        self.firsts[state.key] = batch
        self.active += 1
        self._place(state, state.next_batch())  # the first round is built already: nothing to plan

    def _place(self, state: AdaptiveDepthImage, batch: EngineBatch | None) -> None:
        if batch is None:
            self.finished.append(state)
            self.active -= 1
            return
        batch.tag = state  # routes the answers back; the task is restored when the image finishes
        self.queued.append(batch)

    def _planned(self, timeout: float) -> None:
        """Take the rounds planned remotely or in threads so far (waiting at most `timeout` s)."""
        if self.local:
            for fut in cf.wait(self.local, timeout=timeout, return_when=cf.FIRST_COMPLETED)[0]:
                self.local.discard(fut)
                self._place(*fut.result())
        if not self.planning:
            return
        import ray

        ready, _ = ray.wait(list(self.planning), num_returns=len(self.planning), timeout=timeout)
        for ref in ready:
            self.planning.discard(ref)
            self._place(*ray.get(ref))

    def _done(self) -> Iterator[tuple[EngineBatch, list]]:
        while self.finished:
            state = self.finished.popleft()
            task = state.tag
            task.plan = QueryPlan(state.run.pixels, state.run.prompt_xy, unmarkable=state.run.unmarkable)
            task.plan_report = {"mode": "points"} if task.fixed else state.planner.report()
            batch = self.firsts.pop(state.key)
            batch.tag = task
            yield batch, state.run.completions
