"""shoal.config through the real command: ``shoal config show`` in a subprocess, a real
``shoal scheduler`` listening where only a TOML file says, a worker whose thread count comes
only from ``SHOAL_WORKER__NTHREADS``, and a client whose token comes only from the file."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import shoal
from shoal.testing import no_leaks, spawn_scheduler
from shoal.testing.cluster import ShoalProcess, _running


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """Our environment without any SHOAL_* setting, with ``home`` as HOME and XDG dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / "xdg"), PYTHONUNBUFFERED="1", **extra)
    return env


def user_config(home: Path, text: str) -> Path:
    path = home / "xdg" / "shoal" / "shoal.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def shoal_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shoal.cli", *args], capture_output=True,
                          text=True, timeout=60, check=False, env=env)  # fmt: skip


@contextmanager
def shoal_process(env: dict[str, str], *args: str) -> Iterator[ShoalProcess]:
    """``shoal ARGS`` with exactly ``env``; yields once it prints where it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "shoal.cli", *args], env=env, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    with _running(ShoalProcess(proc, f"shoal {args[0]}"), r"listening at (\S+)", 30) as running:
        yield running


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_config_show_tells_each_value_and_its_source(tmp_path: Path) -> None:
    # given a user config file, a new-style variable, an old-style one
    path = user_config(tmp_path, "[scheduler]\nport = 9123\n[worker]\nnthreads = 2\n")
    env = clean_env(tmp_path, SHOAL_WORKER__NTHREADS="3", SHOAL_TOKEN="s3cret")
    # when shoal config show runs
    shown = shoal_cli(env, "config", "show")
    as_json = shoal_cli(env, "config", "show", "--json")
    # then each value is there with where it came from, and the token is masked
    assert shown.returncode == 0, shown.stderr
    lines = {line.split()[0]: line.split() for line in shown.stdout.splitlines()
             if not line.startswith("#")}  # fmt: skip
    assert lines["scheduler.port"] == ["scheduler.port", "9123", "file", str(path)]
    assert lines["worker.nthreads"] == ["worker.nthreads", "3", "env", "SHOAL_WORKER__NTHREADS"]
    assert lines["client.timeout"] == ["client.timeout", "10.0", "default"]
    assert lines["security.token"][1:] == ['"***"', "env", "SHOAL_TOKEN"]
    assert "s3cret" not in shown.stdout + as_json.stdout
    settings = json.loads(as_json.stdout)["settings"]
    assert json.loads(as_json.stdout)["file"] == str(path)
    assert settings["scheduler.port"] == {"value": 9123, "source": f"file {path}",
                                          "env": "SHOAL_SCHEDULER__PORT"}
    assert settings["worker.nthreads"]["source"] == "env SHOAL_WORKER__NTHREADS"


def test_the_cli_refuses_a_bad_value_naming_key_source_and_allowed(tmp_path: Path) -> None:
    user_config(tmp_path, "[scheduler]\nworker_ttl = -1\n")
    for args in (["config", "show"], ["scheduler"]):
        done = shoal_cli(clean_env(tmp_path), *args)
        assert done.returncode == 2, done.stdout
        assert "scheduler.worker_ttl = -1 from file" in done.stderr
        assert "expected a number > 0" in done.stderr
    user_config(tmp_path, "")
    unknown = shoal_cli(clean_env(tmp_path, SHOAL_WORKER__THREADS="2"), "worker", "tcp://x:1")
    assert unknown.returncode == 2
    assert "unknown setting SHOAL_WORKER__THREADS in the environment" in unknown.stderr


def test_a_real_scheduler_listens_where_the_file_says_unless_a_flag_says_otherwise(
        tmp_path: Path) -> None:  # fmt: skip
    # given a port set only in the user's shoal.toml (and the dashboard off, only there)
    port = free_port()
    user_config(tmp_path, f"[scheduler]\nport = {port}\n[dashboard]\nenabled = false\n")
    env = clean_env(tmp_path)
    # when shoal scheduler starts with no --port, it listens on that port
    with no_leaks(timeout=15), shoal_process(env, "scheduler") as scheduler:
        assert scheduler.address == f"tcp://127.0.0.1:{port}"
        assert not any("dashboard at" in line for line in scheduler.stdout)
    # and a flag beats the file (and SHOAL_SCHEDULER__PORT, which beats the file too)
    env["SHOAL_SCHEDULER__PORT"] = "1"  # the environment says port 1, the flag says any
    with no_leaks(timeout=15), shoal_process(env, "scheduler", "--port", "0") as scheduler:
        assert scheduler.address != f"tcp://127.0.0.1:{port}"
        assert not scheduler.address.endswith(":1")


def test_an_env_variable_reaches_a_real_worker(tmp_path: Path) -> None:
    # given a scheduler, and a worker started with SHOAL_WORKER__NTHREADS=3 and no flag
    env = clean_env(tmp_path, SHOAL_WORKER__NTHREADS="3", SHOAL_DASHBOARD__ENABLED="false")
    with no_leaks(timeout=15), spawn_scheduler(port=0, extra_args=["--no-dashboard"],
                                               env=env) as scheduler:  # fmt: skip
        with shoal_process(env, "worker", scheduler.address, "--name", "from-env"), \
                shoal.Client(scheduler.address, timeout=10, set_as_default=False) as client:  # fmt: skip
            client.wait_for_workers(1, timeout=20)
            # then the worker runs 3 threads
            assert list(client.nthreads().values()) == [3]


def test_a_client_takes_its_token_from_the_file(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # given a scheduler that wants a token, and the token only in the client's config file
    env = clean_env(tmp_path)
    config = tmp_path / "client.toml"
    config.write_text("[security]\ntoken = 'tok-from-file'\n[client]\ntimeout = 7.5\n")
    monkeypatch.setenv("SHOAL_CONFIG", str(config))
    monkeypatch.delenv("SHOAL_TOKEN", raising=False)
    with no_leaks(timeout=15), spawn_scheduler(port=0, token="tok-from-file", env=env,
                                               extra_args=["--no-dashboard"]) as scheduler:  # fmt: skip
        # when a client connects with no token= and no timeout=, it uses the file's
        with shoal.Client(scheduler.address, set_as_default=False) as client:
            assert client.timeout == 7.5 and client.token == "tok-from-file"
            assert client.status == "running"
        # and a keyword beats the file: the wrong token is refused
        with pytest.raises(Exception, match="(?i)token|auth"):
            shoal.Client(scheduler.address, token="wrong", timeout=5, set_as_default=False)
