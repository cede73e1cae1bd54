"""Latency of the primary with and without a shadow version: /predict at 32 clients.

    python -m benchmarks.shadow --rounds 3 --duration 8

One server (2 workers, cache off) serves ``sentiment:v1`` as the primary, ``sentiment:v1canary``
(a copy of v1 made in a temporary store: a classical shadow as costly as the primary) and
``sentiment:v2`` (the transformer). Each round runs ``hey`` at 32 clients with no shadow, then
with each shadow setting, interleaved, so drift in machine speed hits all alike; the figures are
medians over rounds. The shadow's comparison counts are read back at the end. Writes
``OUT/shadow.json`` and ``OUT/shadow.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
import yaml

from benchmarks.bench import ROOT, free_port, hey, server
from benchmarks.common import REVIEW as TEXT

TOKEN = "shadow-bench-token-0123456789"
SETTINGS = [
    ("no shadow", None, 1.0),
    ("shadow v1canary (classical copy), sample 1.0", "v1canary", 1.0),
    ("shadow v2 (transformer), sample 1.0", "v2", 1.0),
    ("shadow v2 (transformer), sample 0.1", "v2", 0.1),
]


def store_with_copy(home: Path, tmp: Path) -> Path:
    """A BENTOML_HOME whose store links the real one's versions and adds sentiment:v1canary, a
    copy of sentiment:v1."""
    models = tmp / "home" / "models"
    for name_dir in (home / "models").iterdir():
        (models / name_dir.name).mkdir(parents=True)
        for entry in name_dir.iterdir():
            if (name_dir.name, entry.name) == ("sentiment", "v1canary"):
                continue  # replaced by the copy below
            if entry.is_dir():
                (models / name_dir.name / entry.name).symlink_to(entry, target_is_directory=True)
            else:
                shutil.copy2(entry, models / name_dir.name / entry.name)
    target = models / "sentiment" / "v1canary"
    shutil.copytree(home / "models" / "sentiment" / "v1", target)
    info = yaml.safe_load((target / "model.yaml").read_text())
    info["version"] = "v1canary"
    info["metadata"]["tag"] = "sentiment:v1canary"
    (target / "model.yaml").write_text(yaml.safe_dump(info, sort_keys=False))
    return tmp / "home"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=8, help="seconds per load run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    home = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="mlserve-shadow-") as tmp:
        env = {
            "BENTOML_HOME": str(store_with_copy(home, Path(tmp))),
            "MLSERVE_MODELS": "sentiment:v1,sentiment:v2,sentiment:v1canary",
            "MLSERVE_WORKERS": "2",
            "MLSERVE_CACHE_ENABLED": "false",
            "MLSERVE_ADMIN_TOKEN": TOKEN,
            "MLSERVE_AUDIT_LOG": str(Path(tmp) / "audit.jsonl"),
            "MLSERVE_CONTROL_BACKEND": "file",
            "HF_HUB_OFFLINE": "1",
        }
        port = free_port()
        bentoml = str(Path(sys.executable).parent / "bentoml")
        cmd = [bentoml, "serve", "service:MLServe", "--working-dir", str(ROOT)]
        cmd += ["--host", "127.0.0.1", "--port", str(port)]
        body = {"text": TEXT, "model_version": "sentiment"}
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with server(cmd, port, env, "/ready") as url, httpx.Client(base_url=url, timeout=60) as c:
            hey(url + "/predict", body, 32, 3)  # warm-up
            for round_no in range(args.rounds):
                for label, version, sample in SETTINGS:
                    setting = {"name": "sentiment", "version": version, "sample": sample}
                    c.post("/admin/models/shadow", json=setting, headers=auth).raise_for_status()
                    r = hey(url + "/predict", body, 32, args.duration)
                    results.setdefault(label, []).append(r)
                    print(f"round {round_no + 1} {label}: {r}", flush=True)
            c.post(
                "/admin/models/shadow", json={"name": "sentiment", "version": None}, headers=auth
            ).raise_for_status()
            compare = c.get("/admin/models/sentiment/compare", headers=auth).json()
    summary = {
        label: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        for label, runs in results.items()
    }
    (args.out / "shadow.json").write_text(
        json.dumps({"runs": results, "median": summary, "compare": compare}, indent=1)
    )
    base = summary["no shadow"]
    lines = [
        f"medians of {args.rounds} interleaved rounds, {args.duration} s each, 32 clients, "
        "2 workers, cache off, primary sentiment:v1",
        "",
        "| setting | req/s | p50 ms | p50 vs no shadow | p99 ms | non-2xx |",
        "|---|---|---|---|---|---|",
    ]
    for label, s in summary.items():
        lines.append(
            f"| {label} | {s['rps']:.0f} | {s['p50_ms']:.2f} | "
            f"{s['p50_ms'] / base['p50_ms'] - 1:+.0%} | {s['p99_ms']:.2f} | {s['non_2xx']:.0f} |"
        )
    lines += [
        "",
        "| pair | requests compared | dropped | errors | agreement |",
        "|---|---|---|---|---|",
    ]
    for p in compare["pairs"]:
        lines.append(
            f"| {p['primary']} -> {p['shadow']} | {p['requests']} | {p['shadow_dropped']} | "
            f"{p['shadow_errors']} | {p['agreement_rate']} |"
        )
    (args.out / "shadow.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
