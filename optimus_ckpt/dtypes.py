"""The tensor dtypes a checkpoint may hold, by name (an allowlist: anything else is refused)."""

from __future__ import annotations

from typing import Any

__all__ = ["DTYPES", "dtype_from_name", "dtype_name", "itemsize"]


def _table() -> dict[str, Any]:
    import torch

    names = [
        "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
        "uint8", "bool", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2",
        "uint16", "uint32", "uint64",
    ]  # fmt: skip
    return {n: getattr(torch, n) for n in names if hasattr(torch, n)}


_DTYPES: dict[str, Any] | None = None


def DTYPES() -> dict[str, Any]:
    global _DTYPES
    if _DTYPES is None:
        _DTYPES = _table()
    return _DTYPES


def dtype_name(dtype: Any) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES():
        raise TypeError(f"tensors of dtype {dtype} cannot be stored")
    return name


def dtype_from_name(name: str) -> Any:
    try:
        return DTYPES()[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown tensor dtype {name!r}") from None


def itemsize(name: str) -> int:
    return int(dtype_from_name(name).itemsize)
