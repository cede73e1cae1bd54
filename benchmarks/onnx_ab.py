"""The int8 ONNX variant against the float torch transformer, side by side in one server.

    .venv/bin/python -m benchmarks.onnx_ab --rounds 3 --duration 10 --out benchmarks/results

One ``bentoml serve service:MLServe`` (2 workers, cache off) loads both versions (by default
``sentiment:v2``, the float MiniLM on torch, and ``sentiment:v3``, its int8 ONNX variant) from
BENTOML_HOME. Each round sends single-text ``/predict`` requests with ``hey`` to one version and
then the other (interleaved, so drift in machine speed hits both alike), at 1 and 32 clients, for
two texts: the benchmark review and a long real drugsCom review (real reviews are longer, and
the encoder's cost grows with the tokens). Medians over the rounds go to ``OUT/onnx_ab.json``
and a markdown table to ``OUT/onnx_ab.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.bench import ROOT, free_port, hey, server
from benchmarks.common import REVIEW as TEXT


def real_review(min_words: int = 90) -> str:
    """A long real review from drugsCom's (the demo's) data (the first of at least
    ``min_words`` words)."""
    from training.data import load_named

    texts = load_named("drugscom").texts
    return next(t for t in texts if len(t.split()) >= min_words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--float-model", default="sentiment:v2")
    parser.add_argument("--int8-model", default="sentiment:v3")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10, help="seconds per load run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    models = {"float": args.float_model, "int8": args.int8_model}
    texts = {"benchmark text": TEXT, "real review": real_review()}
    env = {
        "MLSERVE_MODELS": ",".join(models.values()),
        "MLSERVE_WORKERS": str(args.workers),
        "MLSERVE_CACHE_ENABLED": "false",  # every request reaches the model
        "MLSERVE_INFER_TIMEOUT_SECONDS": "60",  # measure throughput, not admission control
        "HF_HUB_OFFLINE": "1",
    }
    port = free_port()
    cmd = [
        str(ROOT / ".venv" / "bin" / "bentoml"),
        *("serve", "service:MLServe", "--working-dir", str(ROOT)),
        *("--host", "127.0.0.1", "--port", str(port)),
    ]
    runs: dict[str, list[dict]] = {}
    with server(cmd, port, env, "/ready") as url:
        for round_no in range(args.rounds):
            for text_name, text in texts.items():
                for c in (1, 32):
                    for label, tag in models.items():
                        body = {"text": text, "model_version": tag}
                        r = hey(url + "/predict", body, c, args.duration)
                        runs.setdefault(f"{text_name}|{c}|{label}", []).append(r)
                        print(f"round {round_no + 1} {text_name} c={c} {tag}: {r}", flush=True)
    median = {
        key: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for key, rs in runs.items()
    }
    (args.out / "onnx_ab.json").write_text(
        json.dumps({"models": models, "texts": texts, "runs": runs, "median": median}, indent=1)
    )
    lines = [
        f"float = `{models['float']}` (torch), int8 = `{models['int8']}` (ONNX Runtime); "
        f"medians of {args.rounds} interleaved rounds, {args.duration} s each, "
        f"{args.workers} workers, cache off, single-text `/predict`",
        "",
        "| text | clients | float req/s | int8 req/s | int8/float | float p50 ms | int8 p50 ms "
        "| float p99 ms | int8 p99 ms | non-2xx |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for text_name in texts:
        for c in (1, 32):
            f, i = median[f"{text_name}|{c}|float"], median[f"{text_name}|{c}|int8"]
            lines.append(
                f"| {text_name} | {c} | {f['rps']:.1f} | {i['rps']:.1f} | "
                f"{i['rps'] / f['rps']:.2f} | {f['p50_ms']:.1f} | {i['p50_ms']:.1f} | "
                f"{f['p99_ms']:.1f} | {i['p99_ms']:.1f} | {f['non_2xx'] + i['non_2xx']:.0f} |"
            )
    (args.out / "onnx_ab.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
