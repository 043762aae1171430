"""Background jobs from a Flask web app: the request stores a job and answers at once.

A report is slow to make, so ``POST /reports`` does not make it: it stores a job in the
queue (durable: SQLite here, Redis across machines) and answers ``202 Accepted`` with the
URL to poll. Job workers make the report; ``GET /reports/<id>`` tells its status and, once
done, its result. A client that retries its POST with the same ``Idempotency-Key`` header
gets the same job back, not a second one.

    pip install flask 'shoal[cron]'
    export SHOAL_JOBS_SECRET="$(python -c 'import secrets; print(secrets.token_hex(32))')"
    cd examples
    shoal jobs worker flask_jobs:jobs --concurrency 4 &     # one or many, on any machine
    flask --app flask_jobs run                              # the web app
    curl -X POST localhost:5000/reports -H 'Content-Type: application/json' \\
         -d '{"title": "Q3", "values": [3, 1, 4, 1, 5]}'
    curl localhost:5000/reports/<id>

``SHOAL_JOBS_URL`` picks the broker (default ``sqlite:///jobs.db``). tests/docs drives this
app through Flask's test client with a job worker in the test's process.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

from flask import Flask, Response, jsonify, request, url_for

import shoal.jobs


def build(url: str, secret: str | None = None) -> tuple[Flask, shoal.jobs.JobQueue]:
    """The web app and its job queue, on the broker at ``url``."""
    jobs = shoal.jobs.JobQueue(url, secret=secret)

    # a fixed name: the web app and the workers must agree on it whatever the module is called
    @jobs.job(name="reports.make_report", retries=3, time_limit=300)
    def make_report(title: str, values: list[float]) -> dict[str, Any]:
        """The slow part, run by a job worker."""
        return {"title": title, "count": len(values), "mean": statistics.fmean(values),
                "median": statistics.median(values), "max": max(values)}

    app = Flask(__name__)

    def problem(status: int, message: str) -> tuple[Response, int]:
        return jsonify(error=message), status

    @app.post("/reports")
    def create_report() -> tuple[Response, int] | tuple[Response, int, dict[str, str]]:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return problem(400, "the body must be a JSON object: {\"title\": ..., \"values\": [...]}")
        title, values = body.get("title"), body.get("values")
        if not isinstance(title, str) or not title:
            return problem(400, "'title' must be a non-empty string")
        if (not isinstance(values, list) or not values
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
            return problem(400, "'values' must be a non-empty list of numbers")
        key = request.headers.get("Idempotency-Key")
        job = make_report.enqueue(args=(title, values), key=key and f"report:{key}")
        location = url_for("show_report", job_id=job.id)
        return (jsonify(id=job.id, status_url=location, created=job.created), 202,
                {"Location": location})

    @app.get("/reports/<job_id>")
    def show_report(job_id: str) -> Response | tuple[Response, int]:
        job = jobs.get(job_id)
        try:
            status = job.status
        except shoal.jobs.ResultExpired as gone:
            return problem(404, str(gone))
        answer: dict[str, Any] = {"id": job_id, "status": status, "attempts": job.attempts}
        if status == "succeeded":
            answer["report"] = job.result(timeout=0)
        elif status in ("failed", "cancelled"):
            answer["error"] = job.last_error
        return jsonify(answer)

    @app.post("/reports/<job_id>/cancel")
    def cancel_report(job_id: str) -> Response:
        return jsonify(id=job_id, cancelled=jobs.get(job_id).cancel())

    return app, jobs


# `flask --app flask_jobs run` and `shoal jobs worker flask_jobs:jobs` use these; the broker
# is opened on first use, so importing this module touches nothing.
app, jobs = build(os.environ.get("SHOAL_JOBS_URL", "sqlite:///jobs.db"))
