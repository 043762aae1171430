"""The library's keywords default from shoal.config: an embedded cluster, its scheduler and
workers and its client take SHOAL_* settings they are not given, and a keyword still wins."""

from __future__ import annotations

import pytest

import shoal


def test_an_embedded_cluster_takes_its_settings_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # given settings only in the environment
    monkeypatch.setenv("SHOAL_SCHEDULER__WORKER_TTL", "17")
    monkeypatch.setenv("SHOAL_WORKER__RESOURCES", "GPU=2")
    monkeypatch.setenv("SHOAL_COMM__HEARTBEAT_INTERVAL", "0.25")
    monkeypatch.setenv("SHOAL_CLIENT__TIMEOUT", "9")
    # when a client starts an in-process cluster without those keywords
    with shoal.Client(n_workers=1, processes=False, dashboard_address=None,
                      set_as_default=False) as client:  # fmt: skip
        cluster = client.cluster
        # then each part has the configured value
        assert client.timeout == 9.0
        assert cluster.scheduler.worker_ttl == 17.0
        assert [w.resources for w in cluster.workers] == [{"GPU": 2.0}]
        assert [w.heartbeat_interval for w in cluster.workers] == [0.25]
        # and a task asking for the configured resource runs on it
        assert client.submit(lambda: 1, resources={"GPU": 2}).result(timeout=20) == 1


def test_keywords_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_SCHEDULER__WORKER_TTL", "17")
    monkeypatch.setenv("SHOAL_CLIENT__TIMEOUT", "9")
    with shoal.Client(n_workers=1, processes=False, dashboard_address=None, worker_ttl=40,
                      resources={}, timeout=3, set_as_default=False) as client:  # fmt: skip
        assert client.timeout == 3 and client.cluster.scheduler.worker_ttl == 40
        assert client.cluster.workers[0].resources == {}


def test_a_bad_setting_stops_the_client_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_CLIENT__TIMEOUT", "soon")
    with pytest.raises(ValueError, match=r"client.timeout = 'soon' from env SHOAL_CLIENT__TIMEOUT:"
                                         r" expected a number > 0"):
        shoal.Client(n_workers=1, processes=False, set_as_default=False)
