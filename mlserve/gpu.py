"""GPU status for ``GET /gpu``: NVIDIA devices through NVML (``pynvml``, the optional ``gpu``
extra), or ``{"available": false, "device": "cpu"}`` where there is none. Never raises."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

log = logging.getLogger("mlserve.gpu")
WARN_CELSIUS = 80
ERROR_CELSIUS = 85


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpu_status(nvml: Any = None) -> dict[str, Any]:
    """Per GPU: name, memory used and total (MiB), utilisation and temperature. A temperature
    above 80 °C is logged as a warning, above 85 °C as an error. ``nvml`` is the pynvml module
    (imported when not given)."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return {"available": False, "device": "cpu", "reason": "pynvml is not installed"}
    try:
        nvml.nvmlInit()
    except Exception as exc:  # no driver, no device
        return {"available": False, "device": "cpu", "reason": f"NVML: {type(exc).__name__}"}
    try:
        gpus = [_device(nvml, i) for i in range(nvml.nvmlDeviceGetCount())]
        driver = _text(nvml.nvmlSystemGetDriverVersion())
    except Exception as exc:
        return {"available": False, "device": "cpu", "reason": f"NVML: {type(exc).__name__}"}
    finally:
        with contextlib.suppress(Exception):  # nothing to do about a failed shutdown
            nvml.nvmlShutdown()
    if not gpus:
        return {"available": False, "device": "cpu", "reason": "no NVIDIA GPU found"}
    for gpu in gpus:
        temp = gpu["temperature_c"]
        if temp is not None and temp > ERROR_CELSIUS:
            log.error("GPU %s (%s) is at %s °C", gpu["index"], gpu["name"], temp)
        elif temp is not None and temp > WARN_CELSIUS:
            log.warning("GPU %s (%s) is at %s °C", gpu["index"], gpu["name"], temp)
    return {"available": True, "device": "cuda", "driver_version": driver, "gpus": gpus}


def _device(nvml: Any, index: int) -> dict[str, Any]:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        utilization = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:
        utilization = None
    try:
        temperature = float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
    except Exception:
        temperature = None
    return {
        "index": index,
        "name": _text(nvml.nvmlDeviceGetName(handle)),
        "memory_used_mb": round(memory.used / 2**20, 1),
        "memory_total_mb": round(memory.total / 2**20, 1),
        "utilization_percent": utilization,
        "temperature_c": temperature,
    }
