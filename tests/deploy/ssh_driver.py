"""Run inside a network namespace by test_ssh.py: an SSHCluster over real sshd servers.

argv[1] is JSON: {"hosts": [...], "key": path, "python": path}. Prints one JSON line of
what it saw, then exits 0 (or prints the traceback and exits 1).
"""

from __future__ import annotations

import json
import sys
import time
import traceback


def inc(x: int) -> int:
    return x + 1


def add(x: int, y: int) -> int:
    return x + y


def nap(i: int) -> int:
    time.sleep(0.5)
    return i


def wait(condition: object, timeout: float, what: str) -> None:
    start = time.monotonic()
    while not condition():  # type: ignore[operator]
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what}: not within {timeout}s")
        time.sleep(0.1)


def main() -> int:
    import cloudpickle

    import shoal
    from shoal.deploy.ssh import SSHCluster

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    config = json.loads(sys.argv[1])
    ssh_options = ["-i", config["key"], "-o", "StrictHostKeyChecking=no",
                   "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                   "-o", "ConnectTimeout=10"]
    seen: dict[str, object] = {}
    if config.get("unreachable"):  # a worker host without sshd: a clear error, nothing left
        from shoal.deploy import LaunchError

        start = time.monotonic()
        try:
            SSHCluster([config["hosts"][0], config["unreachable"]], ssh_options=ssh_options,
                       remote_python=config["python"], dashboard_address=None,
                       connect_timeout=60)
        except LaunchError as exc:
            seen["error"] = str(exc)
            seen["seconds"] = time.monotonic() - start
        print(json.dumps(seen), flush=True)
        return 0
    with SSHCluster(config["hosts"], ssh_options=ssh_options, remote_python=config["python"],
                    scheduler_port=8786, dashboard_address=None, memory_limit="0",
                    connect_timeout=60, watch_interval=0.5) as cluster:
        seen["repr"] = repr(cluster)
        seen["scheduler_address"] = cluster.scheduler_address
        with shoal.Client(cluster, timeout=30) as client:
            info = client.scheduler_info()
            seen["worker_hosts"] = sorted(a.split("://")[1].rsplit(":", 1)[0]
                                          for a in info["workers"])
            # A graph: a map, then a tree of sums across the workers.
            level = client.map(inc, range(64))
            while len(level) > 1:
                level = [client.submit(add, a, b) for a, b in zip(level[::2], level[1::2])]
            seen["total"] = level[0].result(timeout=60)
            cluster.scale(4)
            cluster.wait_for_workers(4, timeout=60)
            seen["after_scale_up"] = len(client.scheduler_info()["workers"])
            kept = client.map(inc, range(20))
            client.gather(kept)
            cluster.scale(2)
            deadline = 60.0
            start = time.monotonic()
            while len(client.scheduler_info()["workers"]) != 2:
                if time.monotonic() - start > deadline:
                    raise TimeoutError("scale(2) did not retire 2 workers")
                time.sleep(0.1)
            seen["after_scale_down"] = len(client.scheduler_info()["workers"])
            seen["kept"] = client.gather(kept)
            # Adaptive: a burst scales up to the maximum, idle back to the minimum.
            cluster.adapt(minimum=1, maximum=4, target_duration=0.5, wait_count=3,
                          interval=0.3)
            # 40 s of work: still running on 2 workers while 2 more start over ssh
            burst = [client.submit(nap, i, pure=False) for i in range(80)]
            wait(lambda: len(client.scheduler_info()["workers"]) == 4, 60, "adapt up to 4")
            seen["burst"] = client.gather(burst)
            wait(lambda: len(client.scheduler_info()["workers"]) == 1, 60, "adapt down to 1")
            seen["burst_after_scale_down"] = client.gather(burst)
        seen["logs"] = sorted(cluster.get_logs())
    seen["status"] = cluster.status
    print(json.dumps(seen), flush=True)
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except Exception:  # noqa: BLE001 - reported to the test
        traceback.print_exc()
        code = 1
    sys.exit(code)
