"""The dashboards over HTTPS, when the cluster has TLS: the same login as over HTTP (see
test_dashboard_auth.py), a Secure session cookie, a client certificate of the cluster in
place of the token, and the links a local TLS cluster gives. Certificates are made with
``cryptography`` (a test dependency).
"""

from __future__ import annotations

import asyncio
import http.client
import ssl
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# The helpers of the HTTP login tests (this directory is on sys.path).
from test_dashboard_auth import (
    TOKEN,
    Reply,
    assert_needs_login,
    bearer,
    cookie_of,
    request,
    type_into,
)

from shoal.scheduler import Scheduler
from shoal.security import Security
from shoal.security.certs import make_cluster_certificates
from shoal.testing import gen_cluster
from shoal.worker.server import Worker


def https_request(url: str, context: ssl.SSLContext, headers: dict[str, str] | None = None,
                  method: str = "GET", form: dict[str, str] | None = None) -> Reply:  # fmt: skip
    parts = urllib.parse.urlsplit(url)
    assert parts.scheme == "https" and parts.hostname is not None and parts.port is not None
    conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=10, context=context)
    try:
        body = urllib.parse.urlencode(form).encode() if form is not None else None
        send = dict(headers or {})
        if body is not None:
            send["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""),
                     body=body, headers=send)  # fmt: skip
        r = conn.getresponse()
        return Reply(r.status, r.msg, r.read(), r.msg.get_all("Set-Cookie") or [])
    finally:
        conn.close()


def browser_context(ca_file: str, cert: tuple[str, str] | None = None,
                    check_hostname: bool = True) -> ssl.SSLContext:  # fmt: skip
    """What a browser (or Prometheus) that trusts the cluster's CA uses; with ``cert``, it
    shows that client certificate."""
    context = ssl.create_default_context(cafile=ca_file)
    context.check_hostname = check_hostname
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


def test_with_tls_the_dashboards_serve_https_with_the_cluster_certificates(
    tmp_path: Path,
) -> None:
    make_cluster_certificates(tmp_path)  # the worker certificate holds the worker role only
    ca = str(tmp_path / "ca.pem")
    client_cert = (str(tmp_path / "client.pem"), str(tmp_path / "client-key.pem"))
    worker_cert = (str(tmp_path / "worker.pem"), str(tmp_path / "worker-key.pem"))

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
            return await loop.run_in_executor(None, lambda: fn(*args, **kwargs))

        s = await Scheduler(port=0, token=TOKEN, dashboard_address=":0",
                            security=Security.from_directory(tmp_path, "scheduler"))  # fmt: skip
        try:
            link = s.dashboard_link
            assert link.startswith("https://127.0.0.1:") and s.address.startswith("tls://")
            trusting = browser_context(ca)  # checks the host name too: 127.0.0.1 is in the SAN
            # the same rules as over HTTP: 401 without the token, 200 with it, /health open
            assert_needs_login(await call(https_request, link + "api/info", trusting))
            info = (await call(https_request, link + "api/info", trusting, bearer())).json()
            assert info["dashboard"] == link
            assert (await call(https_request, link + "health", trusting)).body == b"ok"
            metrics = await call(https_request, link + "metrics", trusting, bearer())
            assert metrics.status == 200 and b"shoal_workers" in metrics.body
            # the session cookie is Secure
            ok = await call(https_request, link + "login", trusting, method="POST",
                            form={"token": TOKEN, "next": "/"})  # fmt: skip
            assert ok.status == 303
            _, value, attributes = cookie_of(ok)
            assert "; secure" in attributes.lower() and TOKEN not in value
            # a client certificate of the cluster stands in for the token; a worker's does not
            by_cert = await call(https_request, link + "api/session",
                                 browser_context(ca, client_cert))  # fmt: skip
            assert by_cert.json() == {"required": True, "credential": "certificate"}
            assert_needs_login(await call(https_request, link + "api/info",
                                          browser_context(ca, worker_cert)))  # fmt: skip
            # plain HTTP to the HTTPS port gets nothing
            with pytest.raises((http.client.HTTPException, ConnectionError)):
                await call(request, link.replace("https://", "http://") + "api/info")
            # a browser that does not trust the cluster's CA is stopped by TLS itself
            with pytest.raises(ssl.SSLCertVerificationError):
                await call(https_request, link + "health", ssl.create_default_context())

            # a worker's metrics server: HTTPS with the worker's certificate, same login
            w = await Worker(s.address, token=TOKEN, dashboard_address=":0", in_process=True,
                             security=Security.from_directory(tmp_path, "worker"))  # fmt: skip
            try:
                wlink = w.dashboard.url if w.dashboard is not None else ""
                assert wlink.startswith("https://") and s.worker_dashboards[w.address] == wlink
                # (the worker's certificate names no host: check the CA only)
                plain = browser_context(ca, check_hostname=False)
                assert_needs_login(await call(https_request, wlink + "api/logs", plain))
                logs = await call(https_request, wlink + "api/logs?n=5", plain, bearer())
                assert logs.status == 200 and "rows" in logs.json()
            finally:
                await w.close()
        finally:
            await s.close()

        # TLS without a token, on loopback: HTTPS, open as a plain local dashboard is
        s = await Scheduler(port=0, dashboard_address=":0",
                            security=Security.from_directory(tmp_path, "scheduler"))  # fmt: skip
        try:
            info = (await call(https_request, s.dashboard_link + "api/info",
                               browser_context(ca))).json()  # fmt: skip
            assert info["address"] == s.address
        finally:
            await s.close()

        # TLS without a token, beyond loopback: only a client certificate opens it (the
        # form says so)
        s = await Scheduler(port=0, dashboard_address="0.0.0.0:0",
                            security=Security.from_directory(tmp_path, "scheduler"))  # fmt: skip
        try:
            assert s.dashboard is not None
            link = f"https://127.0.0.1:{s.dashboard.server.port}/"
            trusting = browser_context(ca)
            assert_needs_login(await call(https_request, link + "api/info", trusting))
            assert_needs_login(await call(https_request, link + "api/info", trusting,
                                          {"Authorization": "Bearer "}))  # fmt: skip
            page = await call(https_request, link + "login", trusting)
            assert b"This dashboard has no token" in page.body
            refused = await call(https_request, link + "login", trusting, method="POST",
                                 form={"token": "anything", "next": "/"})  # fmt: skip
            assert refused.status == 401 and not refused.cookies
            info = await call(https_request, link + "api/info",
                              browser_context(ca, client_cert))  # fmt: skip
            assert info.json()["address"] == s.address
        finally:
            await s.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_logging_in_over_https_in_chromium(tmp_path: Path,
                                           require: Callable[[object, str], None]) -> None:
    from test_dashboard_live import CHROMIUM, Page, chromium

    require(CHROMIUM is not None, "chromium is not installed (apt-get install -y chromium)")
    import aiohttp

    make_cluster_certificates(tmp_path)

    async def main(devtools: str) -> None:
        s = await Scheduler(port=0, token=TOKEN, dashboard_address=":0",
                            security=Security.from_directory(tmp_path, "scheduler"))  # fmt: skip
        w = await Worker(s.address, token=TOKEN, in_process=True,
                         security=Security.from_directory(tmp_path, "worker"))  # fmt: skip
        try:
            link = s.dashboard_link
            assert link.startswith("https://")
            async with aiohttp.ClientSession() as session:
                async with session.get(devtools + "/json/list") as r:
                    (target,) = [t for t in await r.json() if t["type"] == "page"]
                async with session.ws_connect(target["webSocketDebuggerUrl"],
                                              max_msg_size=0) as ws:  # fmt: skip
                    page = Page(ws)
                    # the browser does not know the cluster's CA: told to go on regardless
                    await page.send("Security.setIgnoreCertificateErrors", ignore=True)
                    await page.send("Page.navigate", url=link)
                    await page.wait_for("location.href.startsWith('https://')"
                                        " && location.pathname === '/login'"
                                        " && document.readyState === 'complete'", 20,
                                        "the login page over HTTPS")  # fmt: skip
                    await type_into(page, "#token", TOKEN)
                    await page.click("#login button[type=submit]")
                    await page.wait_for("location.pathname === '/' && !!document.getElementById("
                                        "'connection-text') && document.getElementById("
                                        "'connection-text').textContent === 'live'", 20,
                                        "the live dashboard over HTTPS")  # fmt: skip
                    await page.wait_for(f"document.querySelector('[data-worker=\"{w.address}\"]')",
                                        20, "the worker's row")  # fmt: skip
                    await page.send("Network.enable")
                    cookies = (await page.send("Network.getCookies", urls=[link]))["cookies"]
                    (cookie,) = [c for c in cookies if c["name"].startswith("shoal_session_")]
                    assert cookie["secure"] and cookie["httpOnly"]
                    assert cookie["sameSite"] == "Strict" and TOKEN not in cookie["value"]
        finally:
            await w.close()
            await s.close()

    with chromium() as devtools:
        asyncio.run(asyncio.wait_for(main(devtools), 75))


def test_a_local_tls_cluster_links_to_its_https_dashboards() -> None:
    security = Security.temporary()
    with gen_cluster(n_workers=1, token=TOKEN, security=security,
                     worker_dashboard_address=":0") as client:  # fmt: skip
        # the link the client gives, and the one the worker reported, are HTTPS
        link = client.dashboard_link or ""
        assert link.startswith("https://127.0.0.1:")
        (w,) = client.scheduler_info()["workers"].values()
        assert w["dashboard"].startswith("https://127.0.0.1:")
        trusting = browser_context(security.ca_file)
        assert_needs_login(https_request(link + "api/info", trusting))
        assert https_request(link + "api/info", trusting, bearer()).json()["workers"] == 1
        plain = browser_context(security.ca_file, check_hostname=False)
        assert https_request(w["dashboard"] + "api/logs", plain, bearer()).status == 200
