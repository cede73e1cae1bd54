"""Check a transformer model on an accelerator: parity with the CPU, throughput, memory release.

python -m benchmarks.gpu_check sentiment:v2 --out gpu_check.json      # device: auto

It loads the stored model twice through the transformer runner, once on the CPU and once on the
chosen device (cuda, then mps, else cpu). It prints JSON with the largest probability difference
and label agreement between the two on real-length texts of mixed lengths, texts/s per batch
size, and the GPU memory held before and after ``close()``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from typing import Any

import numpy as np

from benchmarks.common import TEXT

TEXTS = [
    "Works.",
    TEXT,
    " ".join([TEXT] * 4),
    "Terrible side effects, I stopped after two days and felt sick for a week.",
    " ".join([TEXT] * 12),  # past MLSERVE_MAX_TOKENS: truncated
]


def _gpu_memory(torch: Any, device: str) -> int | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    return int(torch.cuda.memory_allocated())


def check(tag: str, device: str = "auto", sizes: tuple[int, ...] = (1, 32, 128), repeat: int = 5):
    """Run the comparison and return the report as a dict."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from mlserve.settings import get_settings
    from runners import load_runner
    from runners.transformer import pick_device

    chosen = pick_device(device)
    texts = [TEXTS[i % len(TEXTS)] + f" ({i})" for i in range(64)]
    os.environ["MLSERVE_DEVICE"] = "cpu"
    get_settings.cache_clear()
    cpu = load_runner(tag)
    reference = cpu.predict(texts)
    cpu.close()

    os.environ["MLSERVE_DEVICE"] = chosen
    get_settings.cache_clear()
    before = _gpu_memory(torch, chosen)
    runner = load_runner(tag)
    loaded = _gpu_memory(torch, chosen)
    result = runner.predict(texts)
    throughput = {}
    for size in sizes:
        batch = [texts[i % len(texts)] for i in range(size)]
        runner.predict(batch)  # warm this shape
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            runner.predict(batch)
            times.append(time.perf_counter() - start)
        throughput[str(size)] = round(size / statistics.median(times), 1)
    runner.close()
    gc.collect()
    released = _gpu_memory(torch, chosen)
    diff = np.abs(result.probabilities - reference.probabilities)
    return {
        "tag": tag,
        "device": chosen,
        "device_name": torch.cuda.get_device_name() if chosen == "cuda" else chosen,
        "torch": torch.__version__,
        "max_abs_probability_diff_vs_cpu": float(diff.max()),
        "label_agreement_vs_cpu": float(np.mean(np.array(result.predicted) == reference.predicted)),
        "texts_per_s_by_batch_size": throughput,
        "gpu_bytes": {"before_load": before, "loaded": loaded, "after_close": released},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tag")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="also write the report to this file")
    args = parser.parse_args()
    report = json.dumps(check(args.tag, args.device), indent=2)
    print(report)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(report + "\n")
