"""A/B benchmark of two builds of mlserve in one run: /predict at 1 and 32 clients.

    .venv/bin/python -m benchmarks.ab BEFORE_REV [AFTER_REV] --rounds 3 --duration 10

Each revision is checked out into a temporary git worktree and served with
``bentoml serve service:MLServe`` (the same stored model, ``--model``, default topic:v1, from
BENTOML_HOME, cache off, the same worker
count). The two servers run one at a time, interleaved round by round (A B A B ...), so drift in
machine speed hits both alike; each figure is the median over rounds. Load comes from ``hey``.
Writes ``OUT/ab.json`` and a markdown table ``OUT/ab.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

from benchmarks.bench import ROOT, TEXT, free_port, hey, server


def worktree(rev: str, parent: Path) -> Path:
    path = parent / rev.replace("/", "_")
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev],
        check=True,
        capture_output=True,
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", help="git revision A")
    parser.add_argument("after", nargs="?", default="WORKTREE", help="revision B (default: here)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10, help="seconds per load run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", default="topic:v1")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
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
        for label, rev in (("A", args.before), ("B", args.after)):
            trees[label] = ROOT if rev == "WORKTREE" else worktree(rev, Path(tmp))
        try:
            for round_no in range(args.rounds):
                for label in ("A", "B"):
                    port = free_port()
                    cmd = [
                        str(ROOT / ".venv" / "bin" / "bentoml"),
                        *("serve", "service:MLServe", "--working-dir", str(trees[label])),
                        *("--host", "127.0.0.1", "--port", str(port)),
                    ]
                    with server(cmd, port, env, "/ready") as url:
                        for c in (1, 32):
                            r = hey(url + "/predict", body, c, args.duration)
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
            c: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            for c, runs in by_c.items()
        }
        for label, by_c in results.items()
    }
    (args.out / "ab.json").write_text(json.dumps({"runs": results, "median": summary}, indent=1))
    lines = [
        f"A = `{args.before}`, B = `{args.after}`; medians of {args.rounds} interleaved rounds, "
        f"{args.duration} s each, {args.workers} workers, cache off",
        "",
        "| | A req/s | B req/s | B/A | A p50 ms | B p50 ms | A p99 ms | B p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in ("c1", "c32"):
        a, b = summary["A"][c], summary["B"][c]
        lines.append(
            f"| /predict {c[1:]} client(s) | {a['rps']:.0f} | {b['rps']:.0f} | "
            f"{b['rps'] / a['rps']:.3f} | {a['p50_ms']:.2f} | {b['p50_ms']:.2f} | "
            f"{a['p99_ms']:.2f} | {b['p99_ms']:.2f} |"
        )
    (args.out / "ab.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
