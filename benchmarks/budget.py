"""A lone request's time budget, layer by layer, in one process (no network, no load generator).

    .venv/bin/python -m benchmarks.budget --model topic:v1 --repeat 5

Builds the BentoML service's whole ASGI app (``service.MLServe.to_asgi()``: BentoML's
middlewares, mlserve's ASGI middlewares, the mounted FastAPI app), runs its lifespan (the models
load as in a worker, one worker, cache off), then times one request at a time through each layer
from the outside in, each the median of ``--repeat`` interleaved passes of ``--n`` calls:

- the whole app (``POST /predict``) and, for the floor, ``GET /health``;
- the FastAPI app alone (mlserve.http: the route wrapper, body read, validation, answer);
- ``ClassificationService.classify`` (validation, cleaning, the registry, the batcher, metrics,
  drift window);
- the batcher alone (queue, consumer task, the hop to the model thread and back);
- the model on its thread (``run_in_executor``), the model inline, and an empty executor hop;
- for comparison, the plain FastAPI app of ``benchmarks.bench`` (``benchmarks/fastapi_app.py``:
  the same runner in a sync route, so one hop to its thread pool) and the runner's own
  ``predict`` (cleaning and model), which ``benchmarks.inprocess`` times.

``--texts N`` (N > 1) times ``POST /batch-predict`` with N texts instead (the plain FastAPI row
still sends one text).

The differences between rows are what each layer adds. What this leaves out (the HTTP parser,
the socket and the client) is the rest of a served request's latency at one client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time


def _scope(path: str, body: bytes, method: str) -> dict:
    headers = [(b"host", b"127.0.0.1:3000")]
    if body:
        headers += [(b"content-type", b"application/json")]
        headers += [(b"content-length", str(len(body)).encode())]
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 3000),
        "state": {},
    }


async def call(app, path: str, body: bytes = b"", method: str = "POST") -> list[dict]:
    """One request through an ASGI app; the messages it sent back."""
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop() if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(_scope(path, body, method), receive, send)
    return sent


async def start(app) -> None:
    """Run the app's lifespan start-up (BentoML builds the service instance there)."""
    queue: asyncio.Queue = asyncio.Queue()
    started = asyncio.Event()
    await queue.put({"type": "lifespan.startup"})

    async def send(message: dict) -> None:
        if message["type"].startswith("lifespan.startup"):
            started.set()

    app_task = asyncio.ensure_future(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, queue.get, send)
    )
    await asyncio.wait_for(started.wait(), 120)
    start.task = app_task  # type: ignore[attr-defined]  # keep it referenced


async def measure(args: argparse.Namespace) -> dict[str, float]:
    import service
    from benchmarks.common import TEXT, batch_texts

    app = service.MLServe.to_asgi(is_main=True)
    await start(app)
    if args.texts > 1:
        texts = batch_texts(args.texts)
        route, payload = "/batch-predict", {"texts": texts, "model_version": args.model}
    else:
        texts = [TEXT]
        route, payload = "/predict", {"text": TEXT, "model_version": args.model}
    body = json.dumps(payload).encode()
    for _ in range(600):
        if (await call(app, "/ready", method="GET"))[0]["status"] == 200:
            break
        await asyncio.sleep(0.1)
    else:
        raise SystemExit("the service did not become ready")
    core = service._core
    name, version = args.model.split(":")
    model = core.registry.get(name, version)
    cleaned = model.runner.clean(texts)
    loop = asyncio.get_running_loop()
    executor = model.batcher._executor

    async def inline() -> None:
        model.runner.infer(cleaned)

    os.environ["BENCH_MODEL"] = args.model
    from benchmarks import fastapi_app  # the comparison's plain FastAPI app, same runner

    plain_body = json.dumps({"text": TEXT}).encode()
    layers = {
        f"whole app: POST {route}": lambda: call(app, route, body),
        "whole app: GET /health": lambda: call(app, "/health", method="GET"),
        f"FastAPI app (mlserve.http): POST {route}": lambda: call(service.http_app, route, body),
        "core.classify": lambda: core.classify(texts, args.model),
        "batcher.submit": lambda: model.batcher.submit(cleaned, 10.0),
        "model on its thread (run_in_executor)": lambda: loop.run_in_executor(
            executor, model.runner.infer, cleaned
        ),
        "model inline": inline,
        "plain FastAPI app (benchmarks.fastapi_app): POST /predict, 1 text": lambda: call(
            fastapi_app.app, "/predict", plain_body
        ),
        "runner.predict (clean + model, as benchmarks.inprocess)": lambda: asyncio.sleep(
            0, model.runner.predict(texts)
        ),
        "empty hop to the model thread and back": lambda: loop.run_in_executor(executor, int),
    }
    samples: dict[str, list[float]] = {k: [] for k in layers}
    for _ in range(args.repeat):
        for label, fn in layers.items():
            for _ in range(20):
                await fn()
            t0 = time.perf_counter()
            for _ in range(args.n):
                await fn()
            samples[label].append((time.perf_counter() - t0) / args.n * 1e6)
    return {label: statistics.median(v) for label, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="topic:v1")
    parser.add_argument("--n", type=int, default=500, help="calls per pass")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--texts", type=int, default=1, help="texts per request (> 1: POST /batch-predict)"
    )
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    os.environ.update(
        MLSERVE_MODELS=args.model,
        MLSERVE_WORKERS="1",
        MLSERVE_CACHE_ENABLED="false",
        HF_HUB_OFFLINE="1",
    )
    # The access log (one JSON line per request) is still written, to /dev/null.
    devnull = os.open(os.devnull, os.O_WRONLY)
    stderr = os.dup(2)
    os.dup2(devnull, 2)
    if args.loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    loop = asyncio.new_event_loop()
    try:
        result = loop.run_until_complete(measure(args))
    finally:
        with contextlib.suppress(Exception):
            loop.close()
        os.dup2(stderr, 2)
    print(f"| layer ({args.loop}, {args.texts} text(s)) | us per request |\n|---|---|")
    for label, us in result.items():
        print(f"| {label} | {us:.0f} |")
    sys.stdout.flush()
    os._exit(0)  # the service's background threads and tasks need no orderly stop here


if __name__ == "__main__":
    main()
