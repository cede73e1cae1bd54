"""In-process throughput of a stored model, without HTTP: one text per call, and one batch.

python -m benchmarks.inprocess sentiment:v1 --texts 100 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from benchmarks.common import TEXT
from runners import load_runner


def measure(tag: str, n_texts: int, repeat: int) -> dict[str, float]:
    runner = load_runner(tag)
    texts = [f"{TEXT} {i}" for i in range(n_texts)]
    one, batch = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for text in texts:
            runner.predict([text])
        one.append(len(texts) / (time.perf_counter() - t0))
    for _ in range(repeat):
        t0 = time.perf_counter()
        runner.predict(texts)
        batch.append(len(texts) / (time.perf_counter() - t0))
    return {
        "unbatched_texts_per_s": round(statistics.median(one), 1),
        "batch_texts_per_s": round(statistics.median(batch), 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tag")
    parser.add_argument("--texts", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(measure(args.tag, args.texts, args.repeat)))
