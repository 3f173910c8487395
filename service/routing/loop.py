"""The router's asyncio loop thread.

Shard calls run on grpc.aio channels in one event loop (a request's fan-out is a few
coroutines, not a thread per shard call; hedging and cancellation come with it), while the
servicer calls the router from its worker threads: they hand a coroutine to this loop and
wait for its result.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable
from typing import Any


class Loop:
    """An asyncio event loop in a daemon thread; `run` waits for a coroutine from any other
    thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="router-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Awaitable, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()
