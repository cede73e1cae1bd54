"""GET /gpu's status: with NVML and a GPU, and without (no pynvml, no driver, no device).

The NVML side is a small fake of the pynvml module (this machine has no GPU); on a GPU
machine `python -m benchmarks.gpu_check` and `curl /gpu` check the real one."""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace

import pytest

from mlserve.gpu import gpu_status


class FakeNVML:
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, temps: list[float], fail_init: bool = False) -> None:
        self.temps, self.fail_init, self.shutdown = temps, fail_init, False

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shutdown = True

    def nvmlDeviceGetCount(self) -> int:
        return len(self.temps)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return b"NVIDIA H200"

    def nvmlDeviceGetMemoryInfo(self, h: int):
        return SimpleNamespace(used=2 * 2**30, total=141 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, h: int):
        return SimpleNamespace(gpu=37)

    def nvmlDeviceGetTemperature(self, h: int, kind: int) -> float:
        return self.temps[h]

    def nvmlSystemGetDriverVersion(self) -> str:
        return "560.35"


def test_a_gpu_is_reported_and_hot_ones_are_logged(caplog) -> None:
    nvml = FakeNVML([45, 82, 90])
    with caplog.at_level(logging.WARNING, logger="mlserve.gpu"):
        status = gpu_status(nvml)
    assert status["available"] is True and status["device"] == "cuda"
    assert status["driver_version"] == "560.35"
    first = status["gpus"][0]
    assert first == {
        "index": 0,
        "name": "NVIDIA H200",
        "memory_used_mb": 2048.0,
        "memory_total_mb": 144384.0,
        "utilization_percent": 37.0,
        "temperature_c": 45.0,
    }
    levels = {(r.levelname, r.getMessage().split(" (")[0]) for r in caplog.records}
    assert levels == {("WARNING", "GPU 1"), ("ERROR", "GPU 2")}
    assert nvml.shutdown


@pytest.mark.parametrize(
    "nvml,reason",
    [(FakeNVML([], fail_init=True), "NVML"), (FakeNVML([]), "no NVIDIA GPU")],
)
def test_no_driver_or_no_device_is_cpu(nvml, reason) -> None:
    status = gpu_status(nvml)
    assert status["available"] is False and status["device"] == "cpu"
    assert reason in status["reason"]


def test_without_pynvml_the_answer_is_cpu(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    assert gpu_status() == {
        "available": False,
        "device": "cpu",
        "reason": "pynvml is not installed",
    }
