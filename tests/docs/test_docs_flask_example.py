"""examples/flask_jobs.py, driven through Flask's test client with a real job worker and a
real SQLite broker: a POST stores a job and answers at once, a worker makes the report, a
GET shows it; bad input is refused by name; an Idempotency-Key gives the same job back."""

from __future__ import annotations

import importlib.util
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "flask_jobs.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("flask_jobs", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def web(require: Callable[[object, str], None]) -> Iterator[tuple[Any, Any]]:
    require(importlib.util.find_spec("flask") is not None,
            "flask is not installed (pip install -e '.[test]')")
    with tempfile.TemporaryDirectory(prefix="shoal-flask-") as workdir:
        app, jobs = load_example().build(f"sqlite:///{workdir}/jobs.db", secret=secrets.token_hex(32))
        app.config["TESTING"] = True
        try:
            yield app.test_client(), jobs
        finally:
            jobs.close()


def poll(client: Any, url: str, until: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        answer = client.get(url)
        assert answer.status_code == 200, answer.get_json()
        body: dict[str, Any] = answer.get_json()
        if body["status"] == until:
            return body
        assert time.monotonic() < deadline, f"{url} still {body['status']} after {timeout}s"
        time.sleep(0.05)


def test_a_report_is_made_in_the_background(web: tuple[Any, Any]) -> None:
    client, jobs = web
    # no worker yet: the request answers at once, the job waits in the broker
    posted = client.post("/reports", json={"title": "Q3", "values": [3, 1, 4, 1, 5]})
    assert posted.status_code == 202
    body = posted.get_json()
    assert posted.headers["Location"] == body["status_url"] == f"/reports/{body['id']}"
    assert client.get(body["status_url"]).get_json()["status"] == "queued"

    with jobs.worker(concurrency=2):
        done = poll(client, body["status_url"], until="succeeded")
    assert done["report"] == {"title": "Q3", "count": 5, "mean": 2.8, "median": 3, "max": 5}


def test_the_same_idempotency_key_gives_the_same_job(web: tuple[Any, Any]) -> None:
    client, _ = web
    request = {"json": {"title": "once", "values": [1]}, "headers": {"Idempotency-Key": "abc"}}
    first, again = client.post("/reports", **request), client.post("/reports", **request)
    assert first.get_json()["id"] == again.get_json()["id"]
    assert first.get_json()["created"] and not again.get_json()["created"]
    other = client.post("/reports", json={"title": "once", "values": [1]})
    assert other.get_json()["id"] != first.get_json()["id"]


@pytest.mark.parametrize(("payload", "named"), [
    (None, "JSON object"), ({"values": [1]}, "'title'"), ({"title": "x"}, "'values'"),
    ({"title": "x", "values": ["1"]}, "'values'"), ({"title": "x", "values": []}, "'values'"),
])  # fmt: skip
def test_bad_input_is_refused_naming_the_problem(web: tuple[Any, Any], payload: Any,
                                                 named: str) -> None:
    client, _ = web
    answer = (client.post("/reports", data="not json") if payload is None
              else client.post("/reports", json=payload))
    assert answer.status_code == 400
    assert named in answer.get_json()["error"]


def test_unknown_report_is_404_and_a_queued_one_can_be_cancelled(web: tuple[Any, Any]) -> None:
    client, jobs = web
    assert client.get("/reports/no-such-id").status_code == 404
    url = client.post("/reports", json={"title": "never", "values": [1]}).get_json()["status_url"]
    assert client.post(f"{url}/cancel").get_json()["cancelled"] is True
    with jobs.worker(concurrency=1):  # a worker does not run a cancelled job
        assert poll(client, url, until="cancelled")["status"] == "cancelled"
