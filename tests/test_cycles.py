"""The cyclic garbage collector's schedule while the proxy serves."""

from __future__ import annotations

import asyncio
import gc
import weakref

from shadowproxy.cycles import collected_in_the_background


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: reference counting alone never frees it


async def test_cycles_are_freed_by_the_background_collection_not_on_the_data_path() -> None:
    assert gc.isenabled()
    async with collected_in_the_background(interval_s=0.2):
        assert not gc.isenabled(), "automatic collection still runs on the data path"
        node = _Node()
        freed = weakref.ref(node)
        del node
        # Allocation alone, as the data path does, triggers no collection now.
        garbage = [[i] for i in range(50_000)]
        del garbage
        assert freed() is not None
        for _ in range(100):
            if freed() is None:
                break
            await asyncio.sleep(0.02)
        assert freed() is None, "the background collection never freed the cycle"
    assert gc.isenabled(), "the collector was not restored"
    assert gc.get_freeze_count() == 0
