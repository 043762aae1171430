"""The dashboard's login: with a token (or beyond loopback) every page and API of the
scheduler's and the workers' dashboards needs the token as a bearer header or a session
cookie from the login page; ``/health`` stays open; an open dashboard beyond loopback is
refused. Over real HTTP to real local clusters and CLI processes, and through the login
form in Chromium. The same over HTTPS: test_dashboard_auth_https.py.

The HTTP requests here go through `http.client` so that redirects and cookies are seen as
the server sends them (urllib would follow and hide them).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import random
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from typing import TYPE_CHECKING, Any

import pytest

import shoal
from shoal.dashboard.auth import (
    MAX_REVOKED,
    DashboardAuth,
    DashboardRefused,
    check_exposure,
    is_loopback,
)
from shoal.scheduler import Scheduler
from shoal.testing import Gate, gen_cluster, spawn_scheduler, spawn_worker
from shoal.worker.server import Worker

if TYPE_CHECKING:
    from test_dashboard_live import Page

TOKEN = "correct-horse-battery-staple-7f3a"


# --------------------------------------------------------------------------- helpers


@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes
    cookies: list[str] = field(default_factory=list)  # the Set-Cookie headers

    def json(self) -> Any:
        assert self.headers.get("Content-Type", "").startswith("application/json"), self
        return json.loads(self.body)


def request(url: str, method: str = "GET", headers: dict[str, str] | None = None,
            form: dict[str, str] | None = None, timeout: float = 10.0) -> Reply:  # fmt: skip
    """One request to ``url``, redirects not followed."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
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


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def cookie_of(reply: Reply) -> tuple[str, str, str]:
    """(name, value, attributes) of the one cookie ``reply`` sets."""
    (header,) = reply.cookies
    pair, _, attributes = header.partition(";")
    name, _, value = pair.partition("=")
    return name.strip(), value.strip(), attributes


def assert_needs_login(reply: Reply) -> None:
    assert reply.status == 401, (reply.status, reply.body[:200])
    assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    assert "authentication required" in reply.json()["error"]


def inc(x: int) -> int:
    return x + 1


# ------------------------------------------------------------------ the pure parts


def test_sessions_are_macs_that_expire_and_can_be_revoked() -> None:
    auth = DashboardAuth(TOKEN, required=True, port=8787, session_ttl=60)
    session = auth.new_session(now=1000.0)
    assert TOKEN not in session and auth.cookie_name == "shoal_session_8787"
    assert auth.check_session(session, now=1059.0)
    assert not auth.check_session(session, now=1061.0)  # expired
    expires, nonce, mac = session.split(".")
    # a later expiry, a changed nonce or MAC: all rejected
    assert not auth.check_session(f"{int(expires) + 3600}.{nonce}.{mac}", now=1000.0)
    changed = "1" if nonce.endswith("0") else "0"  # a nonce may end in "0" already
    assert not auth.check_session(f"{expires}.{nonce[:-1]}{changed}.{mac}", now=1000.0)
    assert not auth.check_session(f"{expires}.{nonce}.{mac[:-2]}00", now=1000.0)
    assert not auth.check_session("", now=1000.0) and not auth.check_session(None)
    assert not auth.check_session("x" * 1000)
    # another dashboard (even with the same token) did not issue it
    assert not DashboardAuth(TOKEN, required=True).check_session(session, now=1000.0)
    # logging out revokes it, and only it
    other = auth.new_session(now=1000.0)
    auth.revoke(session, now=1001.0)
    assert not auth.check_session(session, now=1002.0)
    assert auth.check_session(other, now=1002.0)


def test_revoked_sessions_are_bounded() -> None:
    auth = DashboardAuth(TOKEN, required=True, session_ttl=60)
    first = auth.new_session(now=0.0)
    auth.revoke(first, now=0.0)
    for _ in range(MAX_REVOKED):
        auth.revoke(auth.new_session(now=0.0), now=0.0)
    assert len(auth._revoked) == MAX_REVOKED
    # expired ones are pruned on the next revoke
    auth.revoke(auth.new_session(now=100.0), now=100.0)
    assert len(auth._revoked) == 1


def test_bearer_header_must_carry_the_exact_token() -> None:
    auth = DashboardAuth(TOKEN, required=True)
    assert auth.check_bearer(f"Bearer {TOKEN}") and auth.check_bearer(f"bearer  {TOKEN} ")
    for header in [None, "", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}",
                   "Bearer", "Bearer \u00e9"]:  # fmt: skip
        assert not auth.check_bearer(header), header
    assert not DashboardAuth(None, required=True).check_bearer("Bearer ")


def test_when_a_login_is_required() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("::")
    assert not is_loopback("10.1.2.3") and not is_loopback("no-such-host.invalid")
    # loopback: open without a token (TLS or not), a login with one
    assert check_exposure("127.0.0.1", 8787, None, tls=False) is False
    assert check_exposure("127.0.0.1", 8787, None, tls=True) is False
    assert check_exposure("127.0.0.1", 8787, TOKEN, tls=False) is True
    assert check_exposure("::1", 8787, TOKEN, tls=True) is True
    # beyond loopback: always a login, and refused with no way to log in
    assert check_exposure("0.0.0.0", 8787, TOKEN, tls=False) is True
    assert check_exposure("0.0.0.0", 8787, None, tls=True) is True
    with pytest.raises(DashboardRefused, match=r"refusing to serve the dashboard at "
                                               r"0\.0\.0\.0:8787.*--token"):  # fmt: skip
        check_exposure("0.0.0.0", 8787, None, tls=False)
    # unless the server was told to run open (--insecure)
    assert check_exposure("0.0.0.0", 8787, None, tls=False, insecure=True) is False


# -------------------------------------------------------- a scheduler with a token


@pytest.fixture
def secured() -> Iterator[shoal.Client]:
    """A local cluster with a token, its scheduler and its 2 workers serving dashboards."""
    with gen_cluster(n_workers=2, token=TOKEN, worker_dashboard_address=":0",
                     timeout=60) as client:  # fmt: skip
        assert client.submit(inc, 1).result(timeout=20) == 2
        yield client


def test_pages_redirect_to_the_login_and_the_api_answers_401(secured: shoal.Client) -> None:
    link = secured.dashboard_link
    assert link is not None and link.startswith("http://127.0.0.1:")
    # a browser asking for the page goes to the login page, and back here after
    page = request(link, headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.status == 303 and page.headers["Location"] == "/login?next=%2F"
    form = request(urllib.parse.urljoin(link, page.headers["Location"]))
    assert form.status == 200 and b'<form id="login" method="post"' in form.body
    assert b'name="next" value="/"' in form.body and TOKEN.encode() not in form.body
    # the JSON API, the event stream, static files and anything not asking for HTML: 401
    for path in ["", "api", "api/info", "api/workers", "api/tasks", "api/logs",
                 "api/snapshot", "api/events", "api/story/x", "api/session",
                 "static/dashboard.js", "no-such-page"]:  # fmt: skip
        assert_needs_login(request(link + path))
    # an API path stays 401 even when a browser asks for it
    assert_needs_login(request(link + "api/info", headers={"Accept": "text/html"}))
    # and a POST elsewhere than /login, whatever it accepts
    assert_needs_login(request(link + "logout", "POST", headers={"Accept": "text/html"}))
    # /health is open
    health = request(link + "health")
    assert health.status == 200 and health.body == b"ok"


def test_bearer_token_opens_the_api_and_metrics(secured: shoal.Client) -> None:
    link = secured.dashboard_link or ""
    assert_needs_login(request(link + "api/info", headers=bearer("wrong-token")))
    assert_needs_login(request(link + "api/info", headers={"Authorization": TOKEN}))
    info = request(link + "api/info", headers=bearer()).json()
    assert info["address"] == secured.scheduler_info()["address"] and info["workers"] == 2
    assert request(link + "api/session", headers=bearer()).json() == {
        "required": True, "credential": "bearer"}  # fmt: skip
    # the page itself, with the token as a header (what a proxy in front could add)
    page = request(link, headers={**bearer(), "Accept": "text/html"})
    assert page.status == 200 and b"shoal dashboard" in page.body
    # Prometheus: /metrics with `authorization: {credentials: TOKEN}`
    assert_needs_login(request(link + "metrics"))
    assert_needs_login(request(link + "metrics", headers=bearer("nope")))
    metrics = request(link + "metrics", headers=bearer())
    assert metrics.status == 200 and b"shoal_workers 2.0" in metrics.body
    # the event stream: its first event comes through
    parts = urllib.parse.urlsplit(link)
    assert parts.hostname is not None and parts.port is not None
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", "/api/events?interval=0.2", headers=bearer())
        stream = conn.getresponse()
        assert stream.status == 200
        line = b""
        deadline = time.monotonic() + 10
        while not line.startswith(b"data: ") and time.monotonic() < deadline:
            line = stream.fp.readline()
        assert json.loads(line[6:])["info"]["workers"] == 2
    finally:
        conn.close()


def test_login_form_sets_a_session_cookie_and_logout_ends_it(secured: shoal.Client,
                                                             caplog: Any) -> None:  # fmt: skip
    link = secured.dashboard_link or ""
    port = urllib.parse.urlsplit(link).port
    # a wrong token: the form again, 401, no cookie, and the offered token is not echoed
    with caplog.at_level(logging.WARNING, logger="shoal.dashboard"):
        wrong = request(link + "login", "POST", form={"token": "guess-123", "next": "/"})
    assert wrong.status == 401 and not wrong.cookies
    assert b"Wrong token." in wrong.body and b"guess-123" not in wrong.body
    assert "wrong token" in caplog.text and "guess-123" not in caplog.text
    assert request(link + "login", "POST", form={"next": "/"}).status == 401  # no token at all

    # the right token: a cookie (HttpOnly, SameSite=Strict; not Secure over plain HTTP)
    # holding a session, not the token, and a redirect to where the browser was going
    ok = request(link + "login", "POST", form={"token": TOKEN, "next": "/api/info?x=1"})
    assert ok.status == 303 and ok.headers["Location"] == "/api/info?x=1"
    name, value, attributes = cookie_of(ok)
    assert name == f"shoal_session_{port}"
    assert TOKEN not in value and TOKEN not in ok.cookies[0]
    lowered = attributes.lower()
    assert "httponly" in lowered and "samesite=strict" in lowered and "path=/" in lowered
    assert "secure" not in lowered.replace("samesite", "")
    session = {"Cookie": f"{name}={value}"}

    # the cookie opens pages and API alike
    assert request(link + "api/info", headers=session).json()["workers"] == 2
    assert request(link + "api/session", headers=session).json()["credential"] == "cookie"
    page = request(link, headers={**session, "Accept": "text/html"})
    assert page.status == 200 and b'id="logout"' in page.body
    # a forged or altered cookie does not
    expires, nonce, mac = value.split(".")
    for forged in [f"{int(expires) + 86400}.{nonce}.{mac}", f"{expires}.{nonce}.{'0' * 64}",
                   TOKEN, ""]:  # fmt: skip
        assert_needs_login(request(link + "api/info", headers={"Cookie": f"{name}={forged}"}))
    # nor does it open another server's dashboard (a worker's, on another port)
    worker_link = next(iter(secured.scheduler_info()["workers"].values()))["dashboard"]
    assert_needs_login(request(worker_link + "api/info", headers={"Cookie": f"{name}={value}"}))

    # logging out clears the cookie and revokes the session, even if it were kept
    out = request(link + "logout", "POST", headers=session)
    assert out.status == 303 and out.headers["Location"] == "/login"
    cleared_name, cleared, cleared_attributes = cookie_of(out)
    assert cleared_name == name and cleared in ("", '""')
    assert "max-age=0" in cleared_attributes.lower()
    assert_needs_login(request(link + "api/info", headers=session))


def test_login_never_redirects_to_another_site(secured: shoal.Client) -> None:
    link = secured.dashboard_link or ""
    for target in ["//evil.example/", "https://evil.example/", "\\\\evil.example", "evil",
                   "/\\evil.example", "/\t/evil.example", "/\n/evil.example", "/ /evil.example",
                   "/\u2215\u2215evil.example"]:  # fmt: skip
        reply = request(link + "login", "POST", form={"token": TOKEN, "next": target})
        assert reply.status == 303 and reply.headers["Location"] == "/", target
        page = request(link + "login?next=" + urllib.parse.quote(target, safe=""))
        assert b'name="next" value="/"' in page.body, target


def test_worker_dashboards_need_the_token_too(secured: shoal.Client) -> None:
    workers = secured.scheduler_info()["workers"]
    assert len(workers) == 2
    for address, w in workers.items():
        link = w["dashboard"]
        assert link.startswith("http://127.0.0.1:")
        for path in ["api/logs", "api/info", "metrics"]:
            assert_needs_login(request(link + path))
            assert_needs_login(request(link + path, headers=bearer("wrong")))
        assert request(link + "api/logs?n=5", headers=bearer()).status == 200
        assert request(link + "api/info", headers=bearer()).json()["address"] == address
        metrics = request(link + "metrics", headers=bearer())
        assert metrics.status == 200 and b"shoal_worker_threads" in metrics.body
        assert request(link + "health").body == b"ok"
        # a browser following the scheduler page's link to a worker's /metrics logs in there
        page = request(link + "metrics", headers={"Accept": "text/html"})
        assert page.status == 303 and page.headers["Location"] == "/login?next=%2Fmetrics"
        ok = request(link + "login", "POST", form={"token": TOKEN, "next": "/metrics"})
        name, value, _ = cookie_of(ok)
        assert request(link + "metrics", headers={"Cookie": f"{name}={value}"}).status == 200
        # its root lists its routes (where the login form sends a browser by default)
        assert "/api/logs" in request(link, headers={"Cookie": f"{name}={value}"}).json()


def test_without_a_token_a_loopback_dashboard_stays_open() -> None:
    with gen_cluster(n_workers=1, worker_dashboard_address=":0") as client:
        link = client.dashboard_link or ""
        assert request(link + "api/info").json()["workers"] == 1
        assert request(link + "api/session").json() == {"required": False, "credential": "none"}
        page = request(link, headers={"Accept": "text/html"})
        assert page.status == 200
        (w,) = client.scheduler_info()["workers"].values()
        assert request(w["dashboard"] + "api/logs").status == 200


# ------------------------------------------------------------- beyond loopback


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_an_open_dashboard_beyond_loopback_is_refused() -> None:
    async def main() -> None:
        # the scheduler refuses to start at all, and leaves nothing listening
        s = Scheduler(port=0, dashboard_address="0.0.0.0:0")
        with pytest.raises(DashboardRefused, match="beyond this machine with no login"):
            await s.start()
        assert s._listener is not None and not _listening(int(s.address.rsplit(":", 1)[1]))

        # with a token it serves, behind the login, on every interface
        s = await Scheduler(port=0, token=TOKEN, dashboard_address="0.0.0.0:0")
        try:
            assert s.dashboard is not None and s.dashboard.server.host == "0.0.0.0"
            port = s.dashboard.server.port
            loop = asyncio.get_running_loop()
            reply = await loop.run_in_executor(
                None, request, f"http://127.0.0.1:{port}/api/info")
            assert_needs_login(reply)

            # a worker asked to serve metrics beyond loopback without a token goes on
            # without them (it says why), and one with the token serves them
            w = await Worker(s.address, token=TOKEN, dashboard_address="0.0.0.0:0",
                             in_process=True)  # fmt: skip
            try:
                assert w.dashboard is not None and w.dashboard.login_required
            finally:
                await w.close()
        finally:
            await s.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_worker_without_token_serves_no_open_metrics_beyond_loopback(caplog: Any) -> None:
    async def main() -> None:
        s = await Scheduler(port=0)
        try:
            with caplog.at_level(logging.WARNING, logger="shoal"):
                w = await Worker(s.address, dashboard_address="0.0.0.0:0", in_process=True)
            try:
                assert w.dashboard is None and w.status == "running"
                assert "refusing to serve the worker metrics" in caplog.text
            finally:
                await w.close()
        finally:
            await s.close()

    asyncio.run(asyncio.wait_for(main(), 60))


# ----------------------------------------------------------------- in a real browser


def test_logging_in_through_the_form_in_chromium_shows_the_live_dashboard(
    require: Callable[[object, str], None],
) -> None:
    # The DevTools driver of the live dashboard test (this directory is on sys.path).
    from test_dashboard_live import CHROMIUM, Page, chromium

    require(CHROMIUM is not None, "chromium is not installed (apt-get install -y chromium)")
    import aiohttp

    with gen_cluster(n_workers=2, token=TOKEN, timeout=90) as client:
        gate = Gate()
        try:
            # given: finished work and a task still running, on a dashboard with a login
            incs = client.map(inc, range(20))  # held: the page shows them in memory
            assert client.gather(incs) == list(range(1, 21))
            running = client.submit(gate, 1)
            workers = sorted(client.scheduler_info()["workers"])
            link = client.dashboard_link or ""

            async def go(devtools: str) -> None:
                async with aiohttp.ClientSession() as session:
                    async with session.get(devtools + "/json/list") as r:
                        (target,) = [t for t in await r.json() if t["type"] == "page"]
                    async with session.ws_connect(target["webSocketDebuggerUrl"],
                                                  max_msg_size=0) as ws:  # fmt: skip
                        await browse(Page(ws), link, workers)

            with chromium() as devtools:
                asyncio.run(asyncio.wait_for(go(devtools), 75))
            assert not running.done()
        finally:
            gate.close()


async def type_into(page: Page, selector: str, text: str) -> None:
    """Focus ``selector``, clear it, and type ``text`` as keyboard input."""
    await page.eval(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                    " e.value = ''; e.focus(); return true; })()")  # fmt: skip
    await page.send("Input.insertText", text=text)


async def browse(page: Page, link: str, workers: list[str]) -> None:
    # when: the browser opens the dashboard's link, it lands on the login page
    await page.send("Page.navigate", url=link + "?interval=0.5")
    await page.wait_for("location.pathname === '/login' && document.readyState === 'complete'"
                        " && !!document.getElementById('token')", 20, "the login page")  # fmt: skip
    assert await page.eval("new URLSearchParams(location.search).get('next')") \
        == "/?interval=0.5"  # fmt: skip
    assert await page.eval("document.getElementById('tabs')") is None
    # a wrong token: the form again, saying so
    await type_into(page, "#token", "not-the-token")
    await page.click("#login button[type=submit]")
    await page.wait_for("document.getElementById('login-error')"
                        " && document.getElementById('login-error').textContent", 20,
                        "the wrong-token message")  # fmt: skip
    assert await page.text("#login-error") == "Wrong token."
    assert "not-the-token" not in await page.eval("document.documentElement.outerHTML")

    # the right token: back to the dashboard, live over the event stream
    await type_into(page, "#token", TOKEN)
    await page.click("#login button[type=submit]")
    await page.wait_for("location.pathname === '/' && location.search === '?interval=0.5'",
                        20, "the dashboard after logging in")  # fmt: skip
    await page.wait_for("document.getElementById('connection-text')"
                        " && document.getElementById('connection-text').textContent === 'live'",
                        20, "the live (event stream) indicator")  # fmt: skip
    await page.wait_for(" && ".join(f"document.querySelector('[data-worker=\"{a}\"]')"
                                    for a in workers), 20, "a row per worker")  # fmt: skip
    await page.wait_for("document.querySelector('.progress-row[data-group=\"inc\"]')"
                        " && document.querySelector('.progress-row[data-group=\"inc\"]')"
                        ".innerText.includes('20 / 20')", 20, "inc's progress")  # fmt: skip
    await page.wait_for("+document.getElementById('task-stream').dataset.runs >= 20", 20,
                        "the task stream's runs")  # fmt: skip
    # the session cookie is out of the page's reach (HttpOnly), and holds no token
    assert await page.eval("document.cookie") == ""
    # the Logs tab reads /api/logs with the cookie
    await page.click('#tabs button[data-tab="logs"]')
    await page.wait_for("document.querySelectorAll('#logs div').length"
                        " || document.getElementById('logs').innerText.includes('No log')",
                        10, "the logs tab")  # fmt: skip
    assert "could not load" not in await page.text("#logs")

    # when: the session ends while the page is open (logged out elsewhere: here a request
    # from the page itself, which does not navigate)
    await page.eval("fetch('/logout', {method: 'POST', redirect: 'manual'}).then(r => r.type)")
    # then: the event stream is cut and the page goes to the login page by itself, to come
    # back where it was
    await page.wait_for("location.pathname === '/login' && document.readyState === 'complete'"
                        " && !!document.getElementById('token')", 20,
                        "the login page once the session ended")  # fmt: skip
    back = await page.eval("new URLSearchParams(location.search).get('next')")
    assert back == "/?interval=0.5#logs", back
    await type_into(page, "#token", TOKEN)
    await page.click("#login button[type=submit]")
    await page.wait_for("location.pathname === '/' && location.hash === '#logs'"
                        " && !!document.getElementById('connection-text') && document"
                        ".getElementById('connection-text').textContent === 'live'", 20,
                        "the live dashboard, logged in again")  # fmt: skip

    # then: logging out ends it: the login page, and the API closed again
    await page.click('#tabs button[data-tab="status"]')
    await page.wait_for("!document.getElementById('logout').hidden", 10, "the logout button")
    await page.click("#logout button")
    await page.wait_for("location.pathname === '/login' && document.readyState === 'complete'",
                        20, "the login page after logging out")  # fmt: skip
    status = await page.eval("fetch('/api/info').then(r => r.status)")
    assert status == 401


# ------------------------------------------------------------------------ the CLI


def test_shoal_scheduler_refuses_an_open_dashboard_beyond_loopback() -> None:
    env = {k: v for k, v in os.environ.items() if k != "SHOAL_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "shoal.cli", "scheduler", "--port", "0",
                           "--dashboard-address", "0.0.0.0:0"], capture_output=True, text=True,
                          timeout=60, env=env, stdin=subprocess.DEVNULL, check=False)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Error: refusing to serve the dashboard at 0.0.0.0:0" in proc.stderr
    assert "--token" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_scheduler_and_worker_with_a_token_serve_dashboards_behind_the_login() -> None:
    with spawn_scheduler(token=TOKEN, extra_args=["--dashboard-address", "0.0.0.0:0"]) \
            as scheduler, \
            spawn_worker(scheduler.address, token=TOKEN, name="auth-worker",
                         extra_args=["--dashboard-address", "0.0.0.0:0"]):  # fmt: skip
        link = scheduler.wait_for_line(r"shoal dashboard at (\S+)", 10).group(1)
        port = urllib.parse.urlsplit(link).port
        local = f"http://127.0.0.1:{port}/"
        assert_needs_login(request(local + "api/workers"))
        deadline = time.monotonic() + 20
        workers: list[Any] = []
        while not workers and time.monotonic() < deadline:
            workers = request(local + "api/workers", headers=bearer()).json()
            time.sleep(0.05)
        (w,) = workers
        assert w["name"] == "auth-worker"
        wport = urllib.parse.urlsplit(w["dashboard"]).port
        assert_needs_login(request(f"http://127.0.0.1:{wport}/api/logs"))
        assert request(f"http://127.0.0.1:{wport}/api/logs", headers=bearer()).status == 200
        # the client knows the link, and nothing in it is the token
        with shoal.Client(scheduler.address, token=TOKEN, timeout=10,
                          set_as_default=False) as client:  # fmt: skip
            assert client.dashboard_link == link and TOKEN not in link


# ------------------------------------------------------------------ bad input


def _random_request(rng: random.Random, port: int, session: str) -> bytes:
    """One HTTP/1.1 request with random credentials, paths and bodies (some malformed)."""
    junk = lambda n: bytes(rng.randrange(256) for _ in range(n))
    path = rng.choice([b"/", b"/api/info", b"/api/logs?n=5", b"/metrics", b"/login",
                       b"/logout", b"/api/events", b"/static/dashboard.js",
                       b"/login?next=" + junk(8).hex().encode(), b"/%00", b"/.." * 5])  # fmt: skip
    method = rng.choice([b"GET", b"POST", b"HEAD", b"PUT"])
    headers = [b"Host: 127.0.0.1:%d" % port, b"Connection: close"]
    auth = rng.choice([None, b"Bearer " + TOKEN.encode()[:-1], b"Bearer", b"Basic " + junk(6),
                       b"Bearer " + junk(40).replace(b"\r", b"").replace(b"\n", b""),
                       b"bearer " + TOKEN.encode() + b"\xff"])  # fmt: skip
    if auth is not None:
        headers.append(b"Authorization: " + auth)
    cookie = rng.choice([None, session.encode()[:-3] + b"abc", b"=;;=", junk(30).hex().encode(),
                         session.encode().replace(b".", b";", 1)])  # fmt: skip
    if cookie is not None:
        headers.append(b"Cookie: shoal_session_%d=" % port + cookie)
    body = b""
    if method == b"POST":
        body = rng.choice([b"token=" + junk(20).hex().encode(), junk(64), b"token=%ff%fe",
                           b"next=//evil&token=x", b"token=" + b"a" * 20_000,
                           b"&".join(b"f%d=1" % i for i in range(50))])  # fmt: skip
        headers.append(b"Content-Type: " + rng.choice([b"application/x-www-form-urlencoded",
                                                       b"multipart/form-data; boundary=x",
                                                       b"text/plain"]))  # fmt: skip
        headers.append(b"Content-Length: %d" % len(body))
    return method + b" " + path + b" HTTP/1.1\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + body


def test_bad_credentials_and_malformed_requests_never_crash_the_dashboard(
    secured: shoal.Client, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from shoal.dashboard import login

    monkeypatch.setattr(login, "WRONG_TOKEN_DELAY", 0.0)  # 300 tries, mostly wrong: no pause
    link = secured.dashboard_link or ""
    port = urllib.parse.urlsplit(link).port
    assert port is not None
    _, session, _ = cookie_of(request(link + "login", "POST", form={"token": TOKEN}))
    rng = random.Random(12)
    statuses: dict[int, int] = {}
    for _ in range(300):
        raw = _random_request(rng, port, session)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(raw)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
        statuses[status] = statuses.get(status, 0) + 1
        # never an error of the server's own, and never a way in without the token
        assert status != 500 and status < 500, (raw[:300], answer[:300])
        assert status != 200 or raw.split(b" ", 2)[1].startswith((b"/login", b"/health")), \
            (raw[:300], answer[:300])  # fmt: skip
    assert statuses.get(401, 0) > 50, statuses
    # and it still serves whoever has the token
    assert request(link + "api/info", headers=bearer()).json()["workers"] == 2


def test_login_takes_only_a_small_urlencoded_form(secured: shoal.Client) -> None:
    link = secured.dashboard_link or ""
    parts = urllib.parse.urlsplit(link)
    assert parts.hostname is not None and parts.port is not None

    def post(body: bytes, content_type: str) -> tuple[int, Any]:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
        try:
            conn.request("POST", "/login", body=body, headers={"Content-Type": content_type})
            r = conn.getresponse()
            return r.status, json.loads(r.read())["error"]
        finally:
            conn.close()

    token = urllib.parse.quote(TOKEN).encode()
    status, error = post(b"--x\r\nContent-Disposition: form-data; name=token\r\n\r\n" + token,
                         "multipart/form-data; boundary=x")  # fmt: skip
    assert status == 415 and "application/x-www-form-urlencoded" in error
    status, error = post(b"token=" + token + b"&pad=" + b"a" * 10_000,
                         "application/x-www-form-urlencoded")  # fmt: skip
    assert status == 413 and "too large" in error
    status, error = post(b"token=" + token + b"".join(b"&f%d=1" % i for i in range(20)),
                         "application/x-www-form-urlencoded")  # fmt: skip
    assert status == 400 and "bad login form" in error


def test_wrong_tokens_take_turns_and_the_right_one_does_not_wait(secured: shoal.Client) -> None:
    """In the form and as a bearer header alike."""
    import aiohttp

    from shoal.dashboard.login import WRONG_TOKEN_DELAY

    link = secured.dashboard_link or ""

    async def main() -> None:
        finished: list[str] = []

        async def attempt(session: aiohttp.ClientSession, token: str, what: str) -> int:
            async with session.post(link + "login", data={"token": token, "next": "/"},
                                    allow_redirects=False) as r:  # fmt: skip
                await r.read()
                finished.append(what)
                return r.status

        async def guess_header(session: aiohttp.ClientSession, token: str) -> int:
            async with session.get(link + "api/info", headers=bearer(token)) as r:
                await r.read()
                finished.append("wrong")
                return r.status

        async with aiohttp.ClientSession() as session:
            start = time.monotonic()
            # given: eight wrong guesses at once, on eight connections, half as headers
            wrong = [asyncio.ensure_future(attempt(session, f"guess-{i}", "wrong") if i % 2
                                           else guess_header(session, f"guess-{i}"))
                     for i in range(8)]  # fmt: skip
            await asyncio.sleep(0)  # they are sent first
            # when: the right token comes while they wait
            assert await attempt(session, TOKEN, "right") == 303
            # then: it passed them all, and they were answered one pause apart
            statuses = await asyncio.gather(*wrong)
            elapsed = time.monotonic() - start
        assert statuses == [401] * 8
        assert finished.index("right") < 7, finished  # not behind the queue of guesses
        assert elapsed >= 8 * WRONG_TOKEN_DELAY, elapsed

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_flood_of_wrong_tokens_is_turned_away(
    secured: shoal.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    import aiohttp

    from shoal.dashboard import login

    monkeypatch.setattr(login, "MAX_WAITING_FAILURES", 2)  # the queue's bound, made small
    link = secured.dashboard_link or ""

    async def main() -> list[int]:
        async with aiohttp.ClientSession() as session:

            async def attempt(i: int) -> int:
                async with session.post(link + "login", data={"token": f"guess-{i}"},
                                        allow_redirects=False) as r:  # fmt: skip
                    await r.read()
                    return r.status

            return list(await asyncio.gather(*(attempt(i) for i in range(6))))

    statuses = asyncio.run(asyncio.wait_for(main(), 60))
    assert sorted(statuses) == [401, 401, 429, 429, 429, 429], statuses
    assert request(link + "api/info", headers=bearer()).status == 200


def test_an_event_stream_ends_when_its_session_is_logged_out(secured: shoal.Client) -> None:
    link = secured.dashboard_link or ""
    name, value, _ = cookie_of(request(link + "login", "POST", form={"token": TOKEN}))
    session = {"Cookie": f"{name}={value}"}
    parts = urllib.parse.urlsplit(link)
    assert parts.hostname is not None and parts.port is not None
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        # given: a page's event stream, open on a session cookie
        conn.request("GET", "/api/events?interval=0.1", headers=session)
        stream = conn.getresponse()
        assert stream.status == 200
        assert stream.readline().startswith(b"retry:")
        assert stream.readline() == b"\n"
        assert stream.readline().startswith(b"data: ")
        # when: that session logs out
        assert request(link + "logout", "POST", headers=session).status == 303
        # then: the stream ends (within a few intervals)
        deadline = time.monotonic() + 10
        while stream.readline() and time.monotonic() < deadline:
            pass
        assert time.monotonic() < deadline, "the stream went on after the logout"
    finally:
        conn.close()
