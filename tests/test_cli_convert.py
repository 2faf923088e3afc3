"""``optimus-ckpt convert``: native <-> torch.save <-> safetensors, every tensor bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from cli_support import code, models_module, run_cli, training_objects

from optimus_ckpt import Checkpointer


class Mixed(torch.nn.Module):
    """Weights of several dtypes, NaN payloads, an integer buffer, an empty tensor."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc = torch.nn.Linear(5, 7)
        self.half = torch.nn.Linear(7, 3).to(torch.bfloat16)
        nan_payloads = torch.tensor([0x7E01, 0x7E55, -1, 0], dtype=torch.int16).view(torch.float16)
        self.register_buffer("nans", nan_payloads)
        self.register_buffer("counts", torch.arange(6, dtype=torch.int64).reshape(2, 3))
        self.register_buffer("empty", torch.empty(0, 4))
        with torch.no_grad():
            self.fc.weight[0, 0] = float("-inf")
            self.fc.bias.view(torch.int32)[1] = 0x7FC01234  # a NaN with a payload


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert _bits(a[k]) == _bits(b[k]), f"{k} differs"


def _native_model_state(path: Path) -> dict[str, torch.Tensor]:
    model = Mixed()
    with torch.no_grad():
        for t in model.state_dict().values():
            t.zero_()
    Checkpointer(path).load(path, "eval", model=model)
    return model.state_dict()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("convert")
    model = Mixed()
    path = Checkpointer(root / "mixed", fsync=False).save(7, model=model)
    models = models_module(root)
    objects = training_objects(models, seed=5)
    full = Checkpointer(root / "full", fsync=False).save(21, config={"lr": 0.5}, **objects)
    return {"root": root, "model": model, "path": Path(path), "full": Path(full),
            "objects": objects}  # fmt: skip


def test_native_to_torch_to_native_is_bit_exact(saved: dict[str, Any]) -> None:
    root = saved["root"]
    out = root / "mixed.pt"
    proc = code(run_cli("convert", saved["path"], out, "--to", "torch", script=True), 0)
    assert f"wrote {out}" in proc.stdout and "step 7" in proc.stdout
    obj = torch.load(out, weights_only=True)
    assert obj["step"] == 7
    _assert_bitwise(obj["model"], saved["model"].state_dict())

    back = root / "mixed_back"
    proc = code(run_cli("convert", out, back, "--to", "native"), 0)
    assert "step_0000000007" in proc.stdout
    _assert_bitwise(_native_model_state(back / "step_0000000007"), saved["model"].state_dict())
    # DST exists now: a usage error, and nothing is touched
    proc = code(run_cli("convert", saved["path"], out, "--to", "torch"), 2)
    assert "already exists" in proc.stderr and "--force" in proc.stderr


def test_native_to_safetensors_to_native_is_bit_exact(saved: dict[str, Any]) -> None:
    root = saved["root"]
    out = root / "mixed.safetensors"
    code(run_cli("convert", saved["path"], out, "--to", "safetensors", "--progress"), 0)
    expected = saved["model"].state_dict()
    st = pytest.importorskip("safetensors.torch")
    _assert_bitwise(st.load_file(str(out)), expected)  # the reference reader agrees
    with st.safe_open(str(out), framework="pt") as sf:
        assert sf.metadata()["step"] == "7"

    back = root / "st_back"
    code(run_cli("convert", out, back, "--to", "native"), 0)
    _assert_bitwise(_native_model_state(back / "step_0000000007"), expected)


def test_native_to_torch_carries_the_training_state(saved: dict[str, Any]) -> None:
    out = saved["root"] / "full.pt"
    proc = code(run_cli("convert", saved["root"] / "full", out, "--to", "torch"), 0)
    assert "left out per-process state 'dataloaders.train'" in proc.stdout
    obj = torch.load(out, weights_only=True)  # loadable without unpickling code
    objects = saved["objects"]
    assert obj["step"] == 21 and "lr: 0.5" in obj["config_yaml"]
    _assert_bitwise(obj["model"], objects["model"].state_dict())
    # the optimizer as a torch state dict: loads into a fresh optimizer and equals the original
    expected = objects["optimizer"].state_dict()
    assert obj["optimizer"]["param_groups"] == expected["param_groups"]
    for i, state in expected["state"].items():
        _assert_bitwise(obj["optimizer"]["state"][i], state)
    fresh = torch.optim.AdamW(objects["model"].parameters(), lr=1e-3)
    fresh.load_state_dict(obj["optimizer"])
    assert obj["scheduler"] == objects["scheduler"].state_dict()
    assert obj["extra"] == {"ema": {"value": 16}}
