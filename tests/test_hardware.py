"""hardware.py: bfloat16 only where this machine multiplies it fast."""
import torch

from pocketlm import hardware


def test_auto_follows_the_measured_speed(monkeypatch):
    hardware.bfloat16_is_fast.cache_clear()
    speeds = {torch.float32: 1.0, torch.bfloat16: 40.0}  # a CPU without bfloat16 units
    monkeypatch.setattr(hardware, "_seconds", lambda dtype, *a, **k: speeds[dtype])
    assert hardware.compute_dtype("auto") is None
    assert hardware.compute_dtype("bfloat16") is torch.bfloat16  # asked for by name: honoured
    hardware.bfloat16_is_fast.cache_clear()
    speeds[torch.bfloat16] = 0.5  # bfloat16 units
    assert hardware.compute_dtype("auto") is torch.bfloat16
    assert hardware.compute_dtype("float32") is None
    hardware.bfloat16_is_fast.cache_clear()

