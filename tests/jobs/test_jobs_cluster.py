"""A job can submit work to a shoal cluster."""

from __future__ import annotations

import shoal
from shoal.jobs import JobQueue


def test_job_submits_to_a_cluster(client: shoal.Client) -> None:
    app = JobQueue("memory://")
    address = client.scheduler_address

    @app.job
    def via_address(n: int) -> int:
        # Any job worker: connect to the cluster by address.
        with shoal.Client(address) as c:
            return int(sum(c.gather(c.map(lambda x: x * x, range(n), pure=False))))

    @app.job
    def via_get_client(n: int) -> int:
        # A worker process with a client open (``shoal jobs worker --scheduler ADDRESS``).
        c = shoal.get_client()
        return int(c.submit(sum, range(n), pure=False).result())

    first, second = via_address.delay(10), via_get_client.delay(5)
    with app.worker(concurrency=2):
        assert first.result(timeout=30) == sum(x * x for x in range(10))
        assert second.result(timeout=30) == 10
    app.close()
