"""Entry point of a worker process started by `LocalCluster` (lean: no CLI imports).

The parent keeps our stdin open; when it reaches EOF the parent is gone (even killed with
SIGKILL), and the worker shuts down, so no process outlives its cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from ..utils.loop import run
from ..worker import Worker


#: Exit code of a worker that the scheduler asked to restart: its nanny starts a new one.
RESTART_EXIT_CODE = 75


async def serve(args: argparse.Namespace) -> int:
    worker = Worker(args.scheduler, nthreads=args.nthreads, name=args.name, host=args.host,
                    token=os.environ.get("SHOAL_TOKEN") or None,
                    memory_limit=args.memory_limit,
                    resources={k: float(v) for k, _, v in (item.partition("=") for item in
                               args.resources.split(",") if item)})  # fmt: skip
    await worker.start()
    loop = asyncio.get_running_loop()
    stop = lambda: asyncio.ensure_future(worker.close("signal"))  # noqa: E731
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    if args.lifeline:
        loop.add_reader(sys.stdin.fileno(), _on_stdin, worker)
    await worker.finished()
    return RESTART_EXIT_CODE if worker.restart_requested else 0


def _on_stdin(worker: Worker) -> None:
    try:
        data = os.read(sys.stdin.fileno(), 1024)
    except OSError:
        data = b""
    if not data:
        asyncio.get_running_loop().remove_reader(sys.stdin.fileno())
        asyncio.ensure_future(worker.close("parent process exited"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="shoal-worker-process")
    parser.add_argument("scheduler")
    parser.add_argument("--nthreads", type=int, default=1)
    parser.add_argument("--name", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--memory-limit", type=int, default=0)
    parser.add_argument("--lifeline", action="store_true")
    parser.add_argument("--resources", default="")
    args = parser.parse_args(argv)
    sys.exit(run(serve(args)))


if __name__ == "__main__":
    main()
