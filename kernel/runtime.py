"""The event loop every planes process runs on (uvloop), and worker threads that survive fork."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a fresh uvloop event loop."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


class ProcessLocalWorker:
    """One worker thread, made on first use and made again in a forked child.

    A child inherits a thread pool's state but not its thread, so a task
    submitted there would wait forever; this makes a new pool in each
    process instead.
    """

    def __init__(self, name: str):
        self.name = name
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0

    def submit(self, function: Callable[..., T], /, *args: Any) -> Future[T]:
        if self._pool is None or self._pid != os.getpid():
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
            self._pid = os.getpid()
        return self._pool.submit(function, *args)

    def shutdown(self) -> None:
        """Stop this process's worker after the work it has; a pool inherited over fork is left alone."""
        if self._pool is not None and self._pid == os.getpid():
            self._pool.shutdown()
        self._pool = None
