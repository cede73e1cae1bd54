"""In-process throughput of a stored model, without HTTP: one text per call, and one batch.

python -m benchmarks.inprocess sentiment:v1 --texts 100 --repeat 5
python -m benchmarks.inprocess topic:v1 --serve   # measure again at each line read from stdin

``--serve`` keeps the model loaded and measures once per line of input, printing one JSON line
each time: ``measure`` as above, or ``paired URL PAIRS``, which alternates one ``POST`` of the
batch to a server's ``/batch-predict`` (URL) with one in-process call on the same texts, PAIRS
times, and reports the median of each. ``benchmarks.bench`` does both in every round, so the
served batch is compared with the in-process one at the same moments: on this machine's shared
cores the speed drifts by a third within minutes, more than the difference being measured.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
import urllib.parse

from benchmarks.common import batch_texts
from runners import load_runner


def measure(tag: str, n_texts: int, repeat: int) -> dict[str, float]:
    return measure_runner(load_runner(tag), n_texts, repeat)


def measure_runner(runner, n_texts: int, repeat: int) -> dict[str, float]:
    texts = batch_texts(n_texts)
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


def measure_paired(runner, url: str, tag: str, n_texts: int, pairs: int) -> dict[str, float]:
    """Alternately one served batch (a keep-alive connection; the body encoded once, the answer
    read whole but not decoded) and one in-process batch of the same texts; the medians."""
    texts = batch_texts(n_texts)
    body = json.dumps({"texts": texts, "model_version": tag}).encode()
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    headers = {"Content-Type": "application/json"}
    served, local = [], []
    try:
        for _ in range(pairs):
            t0 = time.perf_counter()
            conn.request("POST", parts.path, body, headers)
            response = conn.getresponse()
            response_body = response.read()
            served.append(time.perf_counter() - t0)
            if response.status != 200:
                raise SystemExit(f"{url} answered {response.status}: {response_body[:300]!r}")
            t0 = time.perf_counter()
            runner.predict(texts)
            local.append(time.perf_counter() - t0)
    finally:
        conn.close()
    served_s, local_s = statistics.median(served), statistics.median(local)
    return {
        "pairs": pairs,
        "served_ms": round(served_s * 1000, 2),
        "in_process_ms": round(local_s * 1000, 2),
        "share": round(local_s / served_s, 3),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tag")
    parser.add_argument("--texts", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--serve", action="store_true", help="measure at each line of stdin")
    args = parser.parse_args()
    if not args.serve:
        print(json.dumps(measure(args.tag, args.texts, args.repeat)))
    else:
        runner = load_runner(args.tag)
        print(json.dumps({"loaded": args.tag}), flush=True)
        for line in sys.stdin:
            words = line.split()
            if words and words[0] == "paired":
                url, pairs = words[1], int(words[2])
                result = measure_paired(runner, url, args.tag, args.texts, pairs)
            else:
                result = measure_runner(runner, args.texts, args.repeat)
            print(json.dumps(result), flush=True)
