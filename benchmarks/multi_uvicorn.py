"""Run an ASGI app in N uvicorn processes that share one listening socket.

    python -m benchmarks.multi_uvicorn benchmarks.fastapi_app:app --port 3200 --workers 2

``uvicorn --workers N`` hands its children a listening socket whose protocol field is 0, so
asyncio does not set TCP_NODELAY on the connections it accepts. Nagle's algorithm then meets the
client's delayed ACK: on this project's machine every request took 44 ms at one client, even
for an endpoint that returns ``{}``. Here the socket is made with ``IPPROTO_TCP`` and the
workers are forked from this process, so the FastAPI baseline is not slowed by that quirk.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

import uvicorn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            config = uvicorn.Config(args.app, log_level="warning", access_log=False)
            uvicorn.Server(config).run(sockets=[sock])
            os._exit(0)
        children.append(pid)

    def stop(*_: object) -> None:
        for pid in children:
            os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for pid in children:
        os.waitpid(pid, 0)
    sys.exit(0)


if __name__ == "__main__":
    main()
