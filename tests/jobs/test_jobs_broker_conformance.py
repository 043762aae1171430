"""Every broker passes the same conformance checks (shoal.jobs.testing), with a fake clock."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from shoal.jobs.broker import Broker
from shoal.jobs.testing import CHECKS, FakeClock


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_broker_conformance(make_broker: Callable[[FakeClock], Broker], check: str) -> None:
    clock = FakeClock()
    CHECKS[check](make_broker(clock), clock)
