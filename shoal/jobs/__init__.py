"""shoal.jobs: a durable background-job queue with retries, schedules and pipelines.

    app = shoal.jobs.JobQueue("sqlite:///jobs.db")     # or "redis://host", "memory://"

    @app.job(retries=3, time_limit=60)
    def send(to: str) -> str: ...

    handle = send.delay("ada@example.com")
    handle.result(timeout=10)

Run job workers with ``shoal jobs worker myapp:app --concurrency 4 --queues a,b``.

Modules, one concern each:
  app.py          JobQueue: registering jobs and schedules, opening the broker
  definition.py   JobFunction: delay / enqueue / prepare / enqueue_many, and a job's options
  batch.py        Batch: ``with app.batch():`` sends delay() calls many at a time
  job.py          Job: the handle (status, result, cancel, attempts, last_error)
  cancellation.py the cancel flag a running job checks (is_cancelled, check_cancelled)
  message.py      the msgspec envelope (JobMessage) and stored record (JobRecord)
  payload.py      arguments, results and exceptions <-> bytes (cloudpickle)
  broker.py       the Broker interface and the job life cycle every backend implements
  brokers/        memory://, sqlite:///, redis:// backends
  worker.py       Worker: fetch (bounded prefetch), run, heartbeat leases, ack/fail
  executors.py    where an attempt runs: a thread, or a child process (child.py)
  runner.py       one attempt: arguments in, Outcome out
  signing.py      HMAC-SHA256 signatures on every stored pickle (``secret=``)
  metrics.py      a job worker's Prometheus /metrics (attempts, run times, queue counts)
  policy/         pure policy: retries (backoff), time limits, leases, key lifetimes, limits
  schedules.py    pure: cron / interval slots and what is due; periodic.py runs them
  cli.py          ``shoal jobs worker | status | list | dead | retry | cancel | purge``
  testing.py      conformance checks any broker can run
"""

from .app import JobQueue as JobQueue
from .batch import Batch as Batch
from .cancellation import check_cancelled as check_cancelled
from .cancellation import is_cancelled as is_cancelled
from .broker import Broker as Broker
from .definition import JobFunction as JobFunction
from .errors import BadSignature as BadSignature
from .errors import BrokerUnavailable as BrokerUnavailable
from .errors import JobCancelled as JobCancelled
from .errors import JobError as JobError
from .errors import JobFailed as JobFailed
from .errors import ParentFailed as ParentFailed
from .errors import ResultExpired as ResultExpired
from .errors import TimeLimitExceeded as TimeLimitExceeded
from .job import Job as Job
from .message import JobMessage as JobMessage
from .message import JobRecord as JobRecord
from .worker import Worker as Worker
