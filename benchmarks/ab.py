"""A/B benchmark of builds of mlserve in one run: /predict at 1 and 32 clients.

    .venv/bin/python -m benchmarks.ab BEFORE_REV [AFTER_REV ...] --rounds 3 --duration 10
    .venv/bin/python -m benchmarks.ab HEAD HEAD --env B:PYTHONPATH=/path/to/extra/packages

Each revision (``WORKTREE``, the default second one, is this checkout as it is) is checked out
into a temporary git worktree and served with ``bentoml serve service:MLServe`` (the same stored
model, ``--model``, default topic:v1, from BENTOML_HOME; cache off; the same worker count). The
variants are labelled A, B, C, ... in order; ``--env LABEL:KEY=VALUE`` adds an environment
variable to one of them (the same revision with and without a package on the path, say). All
servers are started first and stay up; one at a time is under load, interleaved step by step
within each round (A B C at 1 client, A B C at 32; the order rotates from round to round), so
drift in machine speed hits all alike. Each figure is the median over rounds. Load comes from
``hey``. Writes ``OUT/ab.json`` and a markdown table ``OUT/ab.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import string
import subprocess
import tempfile
from pathlib import Path

from benchmarks.bench import ROOT, free_port, hey, server
from benchmarks.common import TEXT


def worktree(rev: str, parent: Path, label: str) -> Path:
    path = parent / f"{label}-{rev.replace('/', '_')}"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev],
        check=True,
        capture_output=True,
    )
    return path


def parse_env(specs: list[str], labels: list[str]) -> dict[str, dict[str, str]]:
    """``LABEL:KEY=VALUE`` options as each label's extra environment."""
    out: dict[str, dict[str, str]] = {label: {} for label in labels}
    for spec in specs:
        label, _, assignment = spec.partition(":")
        key, sep, value = assignment.partition("=")
        if label not in out or not sep or not key:
            raise SystemExit(f"--env {spec!r}: expected LABEL:KEY=VALUE with LABEL in {labels}")
        out[label][key] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("revs", nargs="+", help="git revisions (WORKTREE: this checkout)")
    parser.add_argument("--env", action="append", default=[], help="LABEL:KEY=VALUE")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10, help="seconds per load run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", default="topic:v1")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    revs = args.revs if len(args.revs) > 1 else [*args.revs, "WORKTREE"]
    labels = list(string.ascii_uppercase[: len(revs)])
    extra_env = parse_env(args.env, labels)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {
        "MLSERVE_MODELS": args.model,
        "MLSERVE_WORKERS": str(args.workers),
        "MLSERVE_CACHE_ENABLED": "false",  # every request reaches the model
        "HF_HUB_OFFLINE": "1",
    }
    body = {"text": TEXT, "model_version": args.model}
    results: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="mlserve-ab-") as tmp:
        trees = {}
        for label, rev in zip(labels, revs, strict=True):
            trees[label] = ROOT if rev == "WORKTREE" else worktree(rev, Path(tmp), label)
        try:
            with contextlib.ExitStack() as stack:
                urls = {}
                for label in labels:
                    port = free_port()
                    cmd = [
                        str(ROOT / ".venv" / "bin" / "bentoml"),
                        *("serve", "service:MLServe", "--working-dir", str(trees[label])),
                        *("--host", "127.0.0.1", "--port", str(port)),
                    ]
                    urls[label] = stack.enter_context(
                        server(cmd, port, {**env, **extra_env[label]}, "/ready")
                    )
                for round_no in range(args.rounds):
                    shift = round_no % len(labels)
                    for c in (1, 32):
                        for label in labels[shift:] + labels[:shift]:
                            r = hey(urls[label] + "/predict", body, c, args.duration)
                            results.setdefault(label, {}).setdefault(f"c{c}", []).append(r)
                            print(f"round {round_no + 1} {label} c={c}: {r}", flush=True)
        finally:
            for tree in trees.values():
                if tree != ROOT:
                    subprocess.run(
                        ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                        check=False,
                        capture_output=True,
                    )
    summary = {
        label: {
            c: {
                k: (sum if k == "non_2xx" else statistics.median)(r[k] for r in runs)
                for k in runs[0]
            }
            for c, runs in by_c.items()
        }
        for label, by_c in results.items()
    }
    (args.out / "ab.json").write_text(json.dumps({"runs": results, "median": summary}, indent=1))
    variants = ", ".join(
        f"{label} = `{rev}`" + "".join(f" {k}={v}" for k, v in extra_env[label].items())
        for label, rev in zip(labels, revs, strict=True)
    )
    lines = [
        f"{variants}; medians of {args.rounds} interleaved rounds, {args.duration} s each, "
        f"{args.workers} workers, cache off, {args.model}",
        "",
        "| variant | clients | req/s | vs A | p50 ms | p99 ms | non-2xx | req/s by round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in ("c1", "c32"):
        base = summary["A"][c]["rps"]
        for label in labels:
            s = summary[label][c]
            rounds = ", ".join(f"{r['rps']:.0f}" for r in results[label][c])
            lines.append(
                f"| {label} | {c[1:]} | {s['rps']:.0f} | {s['rps'] / base:.3f} | "
                f"{s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {s['non_2xx']} | {rounds} |"
            )
    (args.out / "ab.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
