"""Entry point of a worker process started by a `Nanny` (lean: no CLI imports).

The parent keeps our stdin open; when it reaches EOF the parent is gone (even killed with
SIGKILL), and the worker shuts down, so no process outlives its cluster. Once the worker has
joined the scheduler it writes its address on ``--ready-fd``, for the parent to read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys

from ..security.credentials import Security
from ..security.policy import WORKER_FRAME_LIMITS, InsecureBindError, parse_frame_limits
from ..worker.memory import MemoryFractions
from ..protocol.messages import WorkerDeath
from ..utils.loop import run
from ..worker.server import Worker


#: Exit code of a worker that the scheduler asked to restart: its nanny starts a new one.
RESTART_EXIT_CODE = 75


async def serve(args: argparse.Namespace) -> int:
    from ..config import load_config  # the token comes from our nanny's environment

    worker = Worker(args.scheduler, nthreads=args.nthreads, name=args.name, host=args.host,
                    token=load_config().security.token,
                    memory_limit=args.memory_limit,
                    resources={k: float(v) for k, _, v in (item.partition("=") for item in
                               args.resources.split(",") if item)},
                    port=args.port, connect_timeout=args.connect_timeout,
                    heartbeat_interval=args.heartbeat_interval,
                    reconnect_timeout=args.death_timeout,
                    memory_fractions=MemoryFractions.parse(args.memory_fractions)
                    if args.memory_fractions else None,
                    spill_directory=args.spill_directory,
                    previous_death=WorkerDeath(**json.loads(args.previous_death))
                    if args.previous_death else None,
                    dashboard_address=args.dashboard_address,
                    security=Security(args.tls_ca_file, args.tls_cert, args.tls_key)
                    if args.tls_cert else None, insecure=args.insecure,
                    frame_limits=parse_frame_limits(args.max_frame_bytes, WORKER_FRAME_LIMITS))  # fmt: skip
    await worker.start()
    if args.lifetime:  # `shoal worker --lifetime`: retire before a batch walltime
        from ..worker.lifetime import retire_at_lifetime

        lifetime_task = asyncio.ensure_future(retire_at_lifetime(worker, args.lifetime))
    loop = asyncio.get_running_loop()
    stop = lambda: asyncio.ensure_future(worker.close("signal"))  # noqa: E731
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    if args.lifeline:
        loop.add_reader(sys.stdin.fileno(), _on_stdin, worker)
    if args.ready_fd is not None:  # last: whoever reads it may stop us right away
        with os.fdopen(args.ready_fd, "w") as ready:
            ready.write(f"{worker.address}\n")
    await worker.finished()
    if args.lifetime:
        lifetime_task.cancel()
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
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--connect-timeout", type=float, default=10.0)
    parser.add_argument("--heartbeat-interval", type=float, default=0.5)
    parser.add_argument("--death-timeout", type=float, default=60.0)
    parser.add_argument("--memory-fractions", default="",
                        help="target,spill,pause,terminate (see shoal.memory)")
    parser.add_argument("--spill-directory", default=None)
    parser.add_argument("--ready-fd", type=int, default=None,
                        help="write the worker's address there once it has joined")
    parser.add_argument("--previous-death", default=None,
                        help="JSON of the WorkerDeath of the process this one replaces")
    parser.add_argument("--log-level", default=None)
    parser.add_argument("--tls-ca-file", default=None)
    parser.add_argument("--tls-cert", default=None)
    parser.add_argument("--tls-key", default=None)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--lifetime", type=float, default=None,
                        help="seconds after which the worker retires gracefully")
    parser.add_argument("--max-frame-bytes", default="", help="ROLE=SIZE,... (see shoal worker)")
    parser.add_argument("--dashboard-address", default=None,
                        help="[HOST]:PORT of the worker's /metrics server (none by default)")
    args = parser.parse_args(argv)
    if args.log_level:
        logging.basicConfig(level=args.log_level.upper(),
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        code = run(serve(args))
    except (OSError, asyncio.TimeoutError, ValueError, InsecureBindError) as exc:
        # could not join the scheduler, or refused to start as told
        print(f"shoal worker: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
