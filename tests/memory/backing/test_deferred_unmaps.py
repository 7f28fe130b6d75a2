"""DeferredUnmaps (CudaVmmBacking's unmaps that wait for the device without blocking the
host) with fake events: runs on the CPU. Its GPU use is in test_cuda_vmm.py."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avmp.memory.backing.base import BackingError
from avmp.memory.backing.cuda_vmm import DeferredUnmaps


class FakeEvent:
    """Completes when the fake device's clock reaches its time."""

    def __init__(self, device: FakeDevice, at: int) -> None:
        self.device, self.at = device, at

    def query(self) -> bool:
        return self.device.clock >= self.at

    def synchronize(self) -> None:
        self.device.waits += 1
        self.device.clock = max(self.device.clock, self.at)


class FakeDevice:
    def __init__(self) -> None:
        self.clock = 0
        self.waits = 0
        self.unmapped: list[int] = []

    def unmap(self, address: int) -> None:
        self.unmapped.append(address)


def test_reap_unmaps_only_what_the_device_has_passed_and_never_waits() -> None:
    device = FakeDevice()
    retired = DeferredUnmaps(device.unmap)
    retired.add([30, 20], FakeEvent(device, 5))
    retired.add([10], FakeEvent(device, 9))
    assert retired.reap() == 0 and device.unmapped == [] and len(retired) == 3
    device.clock = 5
    assert retired.reap() == 2 and device.unmapped == [30, 20]
    assert 10 in retired and 30 not in retired
    device.clock = 9
    assert retired.reap() == 1 and device.unmapped == [30, 20, 10] and len(retired) == 0
    assert device.waits == 0


def test_settle_waits_for_that_address_and_unmaps_it_and_those_before() -> None:
    device = FakeDevice()
    retired = DeferredUnmaps(device.unmap)
    retired.add([1], FakeEvent(device, 3))
    retired.add([2], FakeEvent(device, 6))
    retired.add([3], FakeEvent(device, 8))
    retired.settle(2)
    assert device.waits == 1 and device.clock == 6
    assert device.unmapped == [1, 2] and len(retired) == 1 and 3 in retired
    retired.settle(99)  # not pending: nothing to wait for
    assert device.waits == 1 and device.unmapped == [1, 2]


def test_settle_all_waits_once_and_empties() -> None:
    device = FakeDevice()
    retired = DeferredUnmaps(device.unmap)
    retired.settle_all()
    assert device.waits == 0
    retired.add([4, 5], FakeEvent(device, 2))
    retired.add([6], FakeEvent(device, 7))
    retired.settle_all()
    assert device.waits == 1 and device.unmapped == [4, 5, 6] and len(retired) == 0


def test_a_failing_unmap_leaves_pending_exactly_what_is_still_mapped() -> None:
    device = FakeDevice()

    def unmap(address: int) -> None:
        if address == 2:
            raise BackingError("cuMemUnmap failed: CUDA_ERROR_INVALID_VALUE")
        device.unmap(address)

    retired = DeferredUnmaps(unmap)
    retired.add([1, 2, 3], FakeEvent(device, 0))
    with pytest.raises(BackingError, match="cuMemUnmap"):
        retired.reap()
    assert device.unmapped == [1] and len(retired) == 2 and 2 in retired and 3 in retired


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "advance", "reap", "settle"]),
                          st.integers(0, 6)), max_size=40))  # fmt: skip
def test_every_address_is_unmapped_once_in_retirement_order_and_never_early(
    ops: list[tuple[str, int]],
) -> None:
    device = FakeDevice()
    retired = DeferredUnmaps(device.unmap)
    events: dict[int, FakeEvent] = {}
    order: list[int] = []
    next_address = 0
    last = 0  # events on one stream complete in the order they were recorded
    for op, value in ops:
        if op == "add":
            last = max(last, device.clock + value)  # recorded behind the work queued
            event = FakeEvent(device, last)
            addresses = list(range(next_address, next_address + value % 3 + 1))
            next_address += len(addresses)
            retired.add(addresses, event)
            events.update(dict.fromkeys(addresses, event))
            order += addresses
        elif op == "advance":
            device.clock += value
        elif op == "reap":
            retired.reap()
        elif order:
            retired.settle(order[value % len(order)])
        for address in device.unmapped:
            assert events[address].query(), f"address {address} unmapped before its event"
    retired.settle_all()
    assert device.unmapped == order
