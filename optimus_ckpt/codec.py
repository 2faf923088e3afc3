"""Safe encoding of small state (scheduler, dataloaders, metrics, RNG, optimizer hyperparameters)
as JSON, so that loading never unpickles anything.

Plain JSON types pass through; everything else is tagged: tuples, dicts with non-string keys,
bytes, tensors, numpy arrays and scalars, torch dtypes and sizes. Tensors are either inlined
(base64) or handed to a ``tensor_sink`` that stores them with the large tensors and leaves a
reference. Anything else is refused at save time with an error naming where it was found.

>>> import torch
>>> state = {"epoch": 3, "betas": (0.9, 0.99), 1: b"x", "t": torch.arange(3)}
>>> out = decode(json.loads(json.dumps(encode(state))))
>>> out["betas"], out[1], out["t"].tolist()
((0.9, 0.99), b'x', [0, 1, 2])
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

from .dtypes import dtype_from_name, dtype_name

__all__ = ["decode", "encode"]

_TAG = "__optimus__"
TensorSink = Callable[[str, Any], str]
TensorSource = Callable[[str], Any]


def _torch() -> Any:
    import torch

    return torch


def _is_numpy(obj: Any) -> bool:
    return type(obj).__module__ == "numpy"


def _is_torch_size(obj: Any) -> bool:
    # torch.Size is a tuple: without this it would come back as a plain tuple.
    return type(obj).__module__ == "torch" and type(obj).__name__ == "Size"


def encode(obj: Any, path: str = "", tensor_sink: TensorSink | None = None) -> Any:
    """Encode ``obj`` as JSON-ready data. ``path`` names where ``obj`` lives, for errors."""
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj  # json writes nan/inf as NaN/Infinity and reads them back
    if isinstance(obj, list):
        return [encode(v, f"{path}.{i}", tensor_sink) for i, v in enumerate(obj)]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields") and not _is_torch_size(obj):
        return {
            _TAG: "tuple",
            "v": [encode(v, f"{path}.{i}", tensor_sink) for i, v in enumerate(obj)],
        }
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k != _TAG for k in obj):
            return {k: encode(v, f"{path}.{k}", tensor_sink) for k, v in obj.items()}
        return {
            _TAG: "dict",
            "v": [
                [encode(k, f"{path}.<key>", None), encode(v, f"{path}.{k}", tensor_sink)]
                for k, v in obj.items()
            ],
        }
    if isinstance(obj, bytes | bytearray):
        return {_TAG: "bytes", "v": base64.b64encode(bytes(obj)).decode("ascii")}
    torch = _torch()
    if isinstance(obj, torch.Tensor):
        if tensor_sink is not None:
            return {_TAG: "ref", "v": tensor_sink(path.lstrip("."), obj)}
        t = obj.detach().cpu().contiguous()
        # reshape(-1): a 0-dim tensor cannot be viewed as bytes directly
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {
            _TAG: "tensor",
            "dtype": dtype_name(t.dtype),
            "shape": list(t.shape),
            "v": base64.b64encode(raw).decode("ascii"),
        }
    if isinstance(obj, torch.dtype):
        return {_TAG: "dtype", "v": dtype_name(obj)}
    if isinstance(obj, torch.Size):
        return {_TAG: "size", "v": list(obj)}
    if _is_numpy(obj):
        import numpy as np

        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                raise TypeError(f"state at '{path}' is a numpy array of Python objects")
            arr = np.ascontiguousarray(obj)
            return {
                _TAG: "ndarray",
                "dtype": arr.dtype.str,
                "shape": list(obj.shape),  # not arr's: ascontiguousarray makes 0-d arrays 1-d
                "v": base64.b64encode(arr.tobytes()).decode("ascii"),
            }
        if isinstance(obj, np.generic):
            return {_TAG: "npscalar", "dtype": obj.dtype.str, "v": encode(obj.item(), path)}
    raise TypeError(
        f"Cannot store state at '{path.lstrip('.')}' of type {type(obj).__module__}."
        f"{type(obj).__qualname__} safely: optimus_ckpt stores small state as JSON and never "
        "pickles. Fix: make state_dict() return plain data (numbers, strings, lists, dicts, "
        "tuples, bytes, tensors, numpy arrays)."
    )


def decode(obj: Any, tensor_source: TensorSource | None = None) -> Any:
    """Inverse of :func:`encode`. ``tensor_source`` resolves tensor references."""
    if isinstance(obj, list):
        return [decode(v, tensor_source) for v in obj]
    if not isinstance(obj, dict):
        return obj
    tag = obj.get(_TAG)
    if tag is None:
        return {k: decode(v, tensor_source) for k, v in obj.items()}
    if tag == "tuple":
        return tuple(decode(v, tensor_source) for v in obj["v"])
    if tag == "dict":
        return {_hashable(decode(k, None)): decode(v, tensor_source) for k, v in obj["v"]}
    if tag == "bytes":
        return base64.b64decode(obj["v"])
    if tag == "ref":
        if tensor_source is None:
            raise ValueError(f"tensor reference {obj['v']!r} without a tensor source")
        return tensor_source(obj["v"])
    if tag == "tensor":
        torch = _torch()
        dtype = dtype_from_name(obj["dtype"])
        shape = [int(s) for s in obj["shape"]]
        raw = bytearray(base64.b64decode(obj["v"]))
        numel = 1
        for s in shape:
            numel *= s
        if len(raw) != numel * dtype.itemsize:
            raise ValueError(f"inline tensor of shape {shape} has {len(raw)} bytes")
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape).clone()
    if tag == "dtype":
        return dtype_from_name(obj["v"])
    if tag == "size":
        return _torch().Size(obj["v"])
    if tag in ("ndarray", "npscalar"):
        import numpy as np

        dt = np.dtype(obj["dtype"])
        if dt.hasobject:
            raise ValueError("refusing a numpy object array")
        if tag == "npscalar":
            return dt.type(obj["v"])
        return np.frombuffer(base64.b64decode(obj["v"]), dtype=dt).reshape(obj["shape"]).copy()
    raise ValueError(f"unknown tag {tag!r} in stored state")


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
