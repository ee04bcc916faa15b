"""The FIFO concurrency gate of the simulated replica (no sockets)."""

from __future__ import annotations

import asyncio

from llmproxy.sim.gate import ConcurrencyGate


async def settle() -> None:
    """Let every ready task run (the gate hands slots over through futures)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_no_limit_never_queues() -> None:
    gate = ConcurrencyGate(0)
    for _ in range(100):
        await gate.acquire()
    assert (gate.running, gate.waiting) == (100, 0)


async def test_slots_are_handed_over_in_arrival_order() -> None:
    gate = ConcurrencyGate(1)
    order: list[int] = []

    async def user(n: int) -> None:
        async with gate.slot():
            order.append(n)

    await gate.acquire()
    tasks = [asyncio.create_task(user(n)) for n in range(3)]
    await settle()
    assert (gate.running, gate.waiting) == (1, 3)
    gate.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert (gate.running, gate.waiting) == (0, 0)


async def test_newcomer_cannot_overtake_the_queue() -> None:
    gate = ConcurrencyGate(1)
    await gate.acquire()
    queued = asyncio.create_task(gate.acquire())
    await settle()
    gate.release()  # the slot now belongs to `queued`, even before it runs
    assert gate.running == 1
    newcomer = asyncio.create_task(gate.acquire())
    await settle()
    assert queued.done()
    assert not newcomer.done()
    assert gate.waiting == 1
    newcomer.cancel()
    await settle()
    assert (gate.running, gate.waiting) == (1, 0)


async def test_cancelled_waiter_leaves_the_queue() -> None:
    gate = ConcurrencyGate(1)
    await gate.acquire()
    waiter = asyncio.create_task(gate.acquire())
    await settle()
    waiter.cancel()
    await settle()
    assert (gate.running, gate.waiting) == (1, 0)
    gate.release()
    assert gate.running == 0


async def test_slot_granted_then_cancelled_is_passed_on() -> None:
    gate = ConcurrencyGate(1)
    await gate.acquire()
    first = asyncio.create_task(gate.acquire())
    second = asyncio.create_task(gate.acquire())
    await settle()
    gate.release()  # hands the slot to `first`...
    first.cancel()  # ...which is cancelled before it could resume
    await settle()
    assert first.cancelled()
    assert second.done()
    assert (gate.running, gate.waiting) == (1, 0)
