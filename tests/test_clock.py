"""The service clock (issue 16, scenario 7): it follows the system clock's own slewing exactly
and does not follow a step, moving towards it at no more than MAX_SLEW."""

from __future__ import annotations

import pytest

from authority.clock import MAX_SLEW, SteadyClock


class Source:
    """A system clock and a never-stepping clock the test moves by hand."""

    def __init__(self) -> None:
        self.wall = 1_800_000_000.0
        self.elapsed = 1_000.0

    def run(self, seconds: float, rate: float = 1.0) -> None:
        """Let ``seconds`` pass; the system clock runs at ``rate`` (NTP slewing: 1 +- ppm)."""
        self.elapsed += seconds
        self.wall += seconds * rate


def clock(source: Source) -> SteadyClock:
    return SteadyClock(wall=lambda: source.wall, elapsed=lambda: source.elapsed)


def test_it_is_the_system_clock_while_nothing_steps() -> None:
    source = Source()
    steady = clock(source)
    for _ in range(100):
        source.run(0.37)
        assert steady.now() == pytest.approx(source.wall, abs=1e-6)


def test_ntp_slewing_under_the_limit_is_followed_exactly() -> None:
    source = Source()
    steady = clock(source)
    for _ in range(1000):
        source.run(1.0, rate=1 + MAX_SLEW / 2)
        assert steady.now() == pytest.approx(source.wall, abs=1e-6)


@pytest.mark.parametrize("step", [300.0, -300.0])
def test_a_step_is_not_followed_and_is_absorbed_at_the_slew_limit(step: float) -> None:
    source = Source()
    steady = clock(source)
    source.run(10.0)
    before = steady.now()
    source.wall += step                       # the system clock jumps by 5 minutes
    source.run(100.0)
    after = steady.now()
    assert after - before == pytest.approx(100.0 + MAX_SLEW * 100.0 * (1 if step > 0 else -1))
    assert steady.offset() == pytest.approx(step - MAX_SLEW * 100.0 * (1 if step > 0 else -1))
    source.wall -= step                       # and back: the service clock never jumped
    source.run(10.0)
    assert steady.now() == pytest.approx(source.wall, abs=MAX_SLEW * 110.0 + 1e-6)


def test_it_never_goes_back_when_the_system_clock_does() -> None:
    source = Source()
    steady = clock(source)
    last = steady.now()
    for _ in range(50):
        source.wall -= 30.0
        source.run(0.1)
        now = steady.now()
        assert now >= last
        last = now
