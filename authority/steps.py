"""Domain work that needs the device, written once and run both ways (sans I/O).

A *plan* is a generator: it does the work before the device, yields one ``DeviceCall``, gets
the device's results sent back (or the device's error thrown in at the ``yield``, so the plan
can answer it: a sealing key the device lost, authority/sealer.py), does the rest, and returns
its value. ``run`` drives a plan with a synchronous backend (the thread-pool server, the key
ring, tests); ``run_async`` with a backend's ``*_many_async`` methods (the aio server with
device processes: its event loop does the Python work and awaits only the device).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class DeviceCall:
    """``seal_many`` (``seal=True``) or ``unseal_many`` of ``items`` (key_id, aad, data)."""

    seal: bool
    items: Sequence[tuple[bytes, bytes, bytes]]


Plan = Generator[DeviceCall, list[Any], T]


class SyncDevice(Protocol):
    def seal_many(self, items: Sequence[tuple[bytes, bytes, bytes]]) -> list[Any]: ...
    def unseal_many(self, items: Sequence[tuple[bytes, bytes, bytes]]) -> list[Any]: ...


class AsyncDevice(Protocol):
    async def seal_many_async(self, items: Sequence[tuple[bytes, bytes, bytes]]
                              ) -> list[Any]: ...
    async def unseal_many_async(self, items: Sequence[tuple[bytes, bytes, bytes]]
                                ) -> list[Any]: ...


def run(plan: Plan[T], device: SyncDevice) -> T:
    """Drive ``plan`` to its value. Raises: what the plan or the device raises."""
    try:
        call = next(plan)
        while True:
            try:
                results = (device.seal_many if call.seal else device.unseal_many)(call.items)
            except Exception as exc:  # thrown into the plan: it answers it or it propagates
                call = plan.throw(exc)
                continue
            call = plan.send(results)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    finally:
        plan.close()


async def run_async(plan: Plan[T], device: AsyncDevice) -> T:
    """Drive ``plan`` to its value, awaiting the device. Raises: what the plan or the device
    raises."""
    try:
        call = next(plan)
        while True:
            try:
                if call.seal:
                    results = await device.seal_many_async(call.items)
                else:
                    results = await device.unseal_many_async(call.items)
            except Exception as exc:  # thrown into the plan: it answers it or it propagates
                call = plan.throw(exc)
                continue
            call = plan.send(results)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    finally:
        plan.close()
