"""The Kubernetes manifests and Dockerfile in deploy/: loaded and checked for what matters
(they are not run on a live cluster here; docs/deploy.md says so).

Checked: every document has a kind, name and the ``shoal`` namespace; each Deployment's
selector matches its pod labels, its containers request CPU and memory and have readiness
probes on ``/health`` at a port the container declares; the Service selects the scheduler's
pods and targets ports the scheduler declares; every Secret referenced is defined; and each
container's arguments parse with the real ``shoal`` CLI.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML (the test extra) reads the manifests")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))


def _documents() -> list[dict[str, Any]]:
    docs = []
    for path in MANIFESTS:
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _documents() if d["kind"] == kind}


def test_every_document_is_named_and_namespaced() -> None:
    assert MANIFESTS, "no manifests in deploy/kubernetes"
    kinds = sorted(d["kind"] for d in _documents())
    assert kinds == ["Deployment", "Deployment", "Namespace", "Secret", "Secret", "Service"]
    for doc in _documents():
        assert doc["apiVersion"] and doc["metadata"]["name"]
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "shoal", doc["metadata"]


def _containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    return list(deployment["spec"]["template"]["spec"]["containers"])


def test_deployments_select_their_pods_request_resources_and_probe_health() -> None:
    deployments = _by_kind("Deployment")
    assert set(deployments) == {"shoal-scheduler", "shoal-worker"}
    assert deployments["shoal-scheduler"]["spec"]["replicas"] == 1
    for name, dep in deployments.items():
        selector = dep["spec"]["selector"]["matchLabels"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{name}: selector does not match its pods"
        for container in _containers(dep):
            requests = container["resources"]["requests"]
            assert "cpu" in requests and "memory" in requests, name
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            for probe in ("readinessProbe", "livenessProbe"):
                check = container[probe]["httpGet"]
                assert check["path"] == "/health", (name, probe)
                assert check["port"] in ports, f"{name}: {probe} port {check['port']} undeclared"


def test_the_service_reaches_the_scheduler_pods_on_declared_ports() -> None:
    service = _by_kind("Service")["shoal-scheduler"]
    scheduler = _by_kind("Deployment")["shoal-scheduler"]
    pod_labels = scheduler["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    declared = {p["name"] for c in _containers(scheduler) for p in c["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= declared
    assert {p["port"] for p in service["spec"]["ports"]} == {8786, 8787}
    # Workers reach the scheduler through this Service's name and port.
    worker_args = _containers(_by_kind("Deployment")["shoal-worker"])[0]["args"]
    assert "tcp://shoal-scheduler:8786" in worker_args


def _secret_refs(node: Any) -> set[str]:
    refs: set[str] = set()
    if isinstance(node, dict):
        if "secretKeyRef" in node:
            refs.add(node["secretKeyRef"]["name"])
        if "secret" in node and isinstance(node["secret"], dict):
            refs.add(node["secret"]["secretName"])
        for value in node.values():
            refs |= _secret_refs(value)
    elif isinstance(node, list):
        for value in node:
            refs |= _secret_refs(value)
    return refs


def test_every_secret_referenced_exists_with_its_keys() -> None:
    secrets = _by_kind("Secret")
    refs = set().union(*(_secret_refs(d) for d in _by_kind("Deployment").values()))
    assert refs == {"shoal-token"}  # TLS is commented out until its secret is filled
    assert refs <= set(secrets)
    assert "token" in secrets["shoal-token"]["stringData"]
    for container in (c for d in _by_kind("Deployment").values() for c in _containers(d)):
        token_env = [e for e in container["env"] if e["name"] == "SHOAL_TOKEN"]
        assert token_env and token_env[0]["valueFrom"]["secretKeyRef"]["key"] == "token"


def test_container_arguments_parse_with_the_real_cli() -> None:
    from shoal.cli import main

    for dep in _by_kind("Deployment").values():
        for container in _containers(dep):
            env = {e["name"] for e in container.get("env", [])}
            args = []
            for arg in container["args"]:
                for var in re.findall(r"\$\((\w+)\)", arg):
                    assert var in env, f"{arg} uses ${var} that the container does not set"
                args.append(re.sub(r"\$\((\w+)\)", "10.0.0.7", arg))
            with main.make_context("shoal", list(args)) as ctx:
                command = main.get_command(ctx, args[0])
                assert command is not None, args
                command.make_context(args[0], args[1:], parent=ctx)  # unknown flags raise


def test_dockerfile_installs_shoal_and_runs_it_unprivileged() -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+", text, re.MULTILINE)
    assert "COPY shoal ./shoal" in text and "pip install" in text
    assert re.search(r"^USER shoal$", text, re.MULTILINE)
    assert 'ENTRYPOINT ["shoal"]' in text
    for port in ("8786", "8787", "8788", "8789"):
        assert port in text
