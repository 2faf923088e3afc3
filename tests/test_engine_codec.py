"""The small-state codec: everything a state_dict() plausibly holds survives JSON bit for bit, and
anything else is refused at save time with a TypeError that names where it was found."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from engine_support import assert_same, make_run
from hypothesis import given, settings
from hypothesis import strategies as st

from optimus_ckpt import Checkpointer
from optimus_ckpt.codec import decode, encode

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")

TORCH_DTYPES = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.complex64,
)  # fmt: skip
NUMPY_DTYPES = ("<f4", "<f8", "<i8", "<i4", "|u1", "<u2", "|b1", "<c8")


@st.composite
def tensors(draw: Any) -> torch.Tensor:
    """Arbitrary bits (NaN payloads included) of any dtype, 0-d to 3-d, empty, non-contiguous."""
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    if draw(st.booleans()):
        t = torch.tensor(draw(st.lists(st.booleans(), min_size=1, max_size=4)))
        return t if draw(st.booleans()) else t[0]
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    numel = int(np.prod(shape)) if shape else 1
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    raw = draw(st.binary(min_size=numel * dtype.itemsize, max_size=numel * dtype.itemsize))
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape).clone()
    if t.dim() == 2 and draw(st.booleans()):
        t = t.t()  # non-contiguous
    return t


@st.composite
def arrays(draw: Any) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(NUMPY_DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    n = int(np.prod(shape)) if shape else 1
    if dtype.kind == "b":
        return np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype).reshape(shape)
    raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


np_scalars = st.one_of(
    st.integers(-(2**63), 2**63 - 1).map(np.int64),
    st.integers(0, 255).map(np.uint8),
    st.floats(width=32, allow_nan=False).map(np.float32),
    st.booleans().map(np.bool_),
)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # arbitrary size
    st.floats(),  # nan and infinities included
    st.text(),
    st.binary(max_size=16),
    tensors(),
    arrays(),
    np_scalars,
    st.sampled_from((torch.float32, torch.bfloat16, torch.int64, torch.bool)),
    st.lists(st.integers(0, 5), max_size=3).map(torch.Size),
)
hashable_keys = st.one_of(
    st.integers(),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
    st.tuples(st.integers(), st.text(max_size=3)),
)
states = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=8), inner, max_size=4),
        st.dictionaries(st.just("__optimus__") | st.text(max_size=4), inner, max_size=3),
        st.dictionaries(hashable_keys, inner, max_size=4),
    ),
    max_leaves=12,
)


def through_json(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


@settings(max_examples=300, deadline=None)
@given(states)
def test_codec_round_trips_through_json_bit_for_bit(state: Any) -> None:
    assert_same(decode(through_json(encode(state, "state"))), state, "round trip")


@settings(max_examples=100, deadline=None)
@given(states)
def test_codec_round_trips_with_tensors_stored_apart(state: Any) -> None:
    stored: dict[str, torch.Tensor] = {}

    def sink(path: str, tensor: torch.Tensor) -> str:
        key = f"t{len(stored)}:{path}"
        stored[key] = tensor.detach().clone()
        return key

    encoded = through_json(encode(state, "state", sink))
    assert_same(decode(encoded, stored.__getitem__), state, "round trip with a tensor store")


def test_zero_dim_tensors_are_stored_inline() -> None:
    for t in (torch.tensor(3.5), torch.tensor(7, dtype=torch.int64), torch.tensor(True)):
        assert_same(decode(through_json(encode({"x": t}))), {"x": t}, "0-d tensor")


class Holder:
    def __init__(self, state: Any) -> None:
        self.state = state

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, sd: Any) -> None:
        self.state = sd


class Opaque:
    pass


@pytest.mark.parametrize(
    ("kwargs", "where"),
    [
        ({"metrics": Holder({"loss": 1.0, "meter": {"obj": Opaque()}})}, "metrics.meter.obj"),
        ({"scheduler": Holder({"fn": lambda s: s})}, "scheduler.fn"),
        (
            {"dataloaders": {"train": Holder({"sampler": [1, Opaque()]})}},
            "dataloaders.train.sampler.1",
        ),
        ({"data_sources": {"web": Holder({"it": iter([1])})}}, "data_sources.web.it"),
        ({"extra": {"ema": Holder({"w": torch.zeros(2), "cfg": Opaque()})}}, "extra.ema.cfg"),
        ({"extra": {"scaler": Holder({"arr": np.array([object()])})}}, "extra.scaler.arr"),
    ],
    ids=["metrics", "scheduler", "dataloader", "data_source", "extra", "object-array"],
)
def test_arbitrary_objects_are_refused_at_save_naming_the_path(
    tmp_path: Path, kwargs: dict[str, Any], where: str
) -> None:
    model = make_run(seed=0, steps=0).model
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(TypeError) as err:
        ckpt.save(1, model=model, **kwargs)
    assert f"'{where}'" in str(err.value)
    assert "never pickles" in str(err.value) or "objects" in str(err.value)
    assert ckpt.checkpoints() == []
    assert not [n for n in os.listdir(tmp_path) if n.startswith("step_")]


def test_small_state_with_zero_dim_tensors_saves_and_loads(tmp_path: Path) -> None:
    """Per-process state is stored inline: a metrics object holding 0-d tensors round-trips."""
    metrics = Holder({"best": torch.tensor(0.25), "seen": torch.tensor(12), "hist": torch.ones(3)})
    model = make_run(seed=0, steps=0).model
    path = Checkpointer(tmp_path).save(1, model=model, metrics=metrics)
    other = Holder({})
    report = Checkpointer(tmp_path).load(path, "resume", model=model, metrics=other)
    assert "metrics" in report.loaded
    assert_same(other.state, metrics.state, "metrics")
