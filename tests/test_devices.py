import pytest
import torch

from dblocks_fast import devices


def test_device_strings_resolve_or_say_what_to_use(monkeypatch):
    assert devices.resolve("cpu") == torch.device("cpu")
    assert devices.resolve(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="'tpu' is not a device; use auto, cpu, cuda or cuda:N"):
        devices.resolve("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve("auto") == devices.resolve(None) == torch.device("cpu")
    for name in ("cuda", "cuda:7"):
        with pytest.raises(
            ValueError, match=f"'{name}' was requested but CUDA is not available.*--device cpu"
        ):
            devices.resolve(name)
    # a machine with one GPU, asked for the eighth: alone, or as the eighth process of a torchrun
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert devices.resolve("cuda:0") == torch.device("cuda", 0)
    assert devices.resolve("cuda", local_rank=0) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"this machine has 1 GPU \(cuda:0 to cuda:0\)"):
        devices.resolve("cuda:7")
    with pytest.raises(ValueError, match="start at most 1 processes per node"):
        devices.resolve("cuda", local_rank=7)
