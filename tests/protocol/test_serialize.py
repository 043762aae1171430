"""`serialize`: plain argument nests take the C pickler; everything else goes to cloudpickle,
and both give back what went in."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from shoal.protocol.serialize import deserialize, serialize


class Tagged(int):
    """An int subclass that pickles as something else: it must not take the plain path."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (str, ("tagged",))


@pytest.mark.parametrize(
    "value",
    [((5,), {}), ((1, 2.5, "x", b"y", None, True, 3j), {"k": [1, (2, 3)]}), ([], {}), ("",)],
)
def test_plain_nests_are_written_by_the_standard_pickler(value: Any) -> None:
    packed = serialize(value)

    assert packed.frames == [pickle.dumps(value, protocol=5)]
    assert deserialize(packed) == value


def test_code_in_the_arguments_still_goes_by_value() -> None:
    # A lambda cannot be pickled by reference: the plain path must not take it.
    packed = serialize(((lambda x: x + 1,), {}))

    fn = deserialize(packed)[0][0]
    assert fn(1) == 2


def test_a_subclass_pickles_its_own_way() -> None:
    packed = serialize(((Tagged(3),), {}))

    assert deserialize(packed) == (("tagged",), {})


def test_deep_or_long_nests_fall_back_and_still_round_trip() -> None:
    deep = (((((1,),),),),)
    long = tuple(range(100))
    keyed = {1: "int key"}

    for value in (deep, long, keyed):
        assert deserialize(serialize(value)) == value
