"""The bounded wait of a micro-batcher: give other work a moment to join a batch."""

from __future__ import annotations

import asyncio
from typing import Callable


async def wait_for_company(wakeup: asyncio.Event, deadline: float, clock: Callable[[], float],
                           is_full: Callable[[], bool]) -> None:
    """Return when the batch is full or `deadline` (on `clock`) passes; `wakeup` is set by
    whoever adds work, so each arrival re-checks fullness."""
    while not is_full():
        remaining = deadline - clock()
        if remaining <= 0:
            return
        wakeup.clear()
        try:
            await asyncio.wait_for(wakeup.wait(), remaining)
        except TimeoutError:
            return
