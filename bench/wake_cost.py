"""What this machine charges a process for sleeping and being woken, by the sleep's length.

A proxy in front of a model idles between arrivals: it sleeps in ``epoll_wait`` and is
woken by the next request or answer, several times per request at a model's pace. This
measures the CPU time (``time.process_time``: user and system) a process is charged per
wake-up, for sleeps from 0.2 to 5 ms, through the event loop (uvloop's ``epoll_wait``, as
the proxy sleeps) and through ``time.sleep``. Nothing else is done between the sleeps, so
what is measured is the sleep and the wake-up themselves. On a virtual machine the
figure depends on how the hypervisor and the guest's idle driver (``cpuidle-haltpoll`` on
KVM) treat an idle virtual CPU; it is a property of the machine, not of the proxy.

    taskset -c 0 python bench/wake_cost.py
"""

from __future__ import annotations

import argparse
import asyncio
import time

import uvloop

SLEEPS_MS = (0.2, 0.5, 1.0, 2.0, 5.0)


async def loop_sleeps(seconds: float, count: int) -> float:
    started = time.process_time()
    for _ in range(count):
        await asyncio.sleep(seconds)
    return (time.process_time() - started) / count


def thread_sleeps(seconds: float, count: int) -> float:
    started = time.process_time()
    for _ in range(count):
        time.sleep(seconds)
    return (time.process_time() - started) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="sleeps per length")
    args = parser.parse_args()
    print("| sleep ms | CPU µs charged per sleep, uvloop (epoll_wait) | time.sleep |\n"
          "|---:|---:|---:|")
    for ms in SLEEPS_MS:
        # libuv's timers count whole milliseconds: a shorter sleep does not sleep at all.
        on_loop = (f"{uvloop.run(loop_sleeps(ms / 1000, args.count)) * 1e6:.0f}"
                   if ms >= 1 else "–")
        print(f"| {ms:g} | {on_loop} | {thread_sleeps(ms / 1000, args.count) * 1e6:.0f} |")


if __name__ == "__main__":
    main()
