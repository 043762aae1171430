"""The login in front of a dashboard: an aiohttp middleware and the login and logout routes.

Every request must authenticate (see `shoal.dashboard.auth` for when and how) except
``/health``, the login page itself and the favicon. One that does not:

- a browser asking for a page (``GET``, ``Accept: text/html``, outside ``/api/``) is
  redirected to ``/login?next=<where it was going>``;
- anything else (the JSON API, the event stream, ``/metrics``) gets ``401`` with
  ``{"error": ...}`` and ``WWW-Authenticate: Bearer``.

``POST /login`` takes the token from a form field, compares it in constant time and sets a
session cookie (HttpOnly, SameSite=Strict, Secure over HTTPS), never the token itself; a
wrong token gets the form again with 401. Wrong tokens, in the form or as a bearer header,
are answered after a pause that they take in turn (`LoginGuard`): guessing is slow however
many connections try.
``POST /logout`` revokes the session and clears the cookie. ``GET /api/session`` says how
this request was authenticated (the page shows its logout button from it).
"""

from __future__ import annotations

import asyncio
import html
import logging
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, quote

from aiohttp import web

from .auth import CertificateCheck, Credential, DashboardAuth

logger = logging.getLogger("shoal.dashboard")

__all__ = ["CertificateCheck", "LoginGuard", "peer_certificate_ok", "still_authorized"]

#: paths served to anyone
OPEN_PATHS = frozenset({"/health", "/login", "/favicon.ico"})
#: the pause before answering a wrong token (wrong tries take turns: see `LoginGuard`)
WRONG_TOKEN_DELAY = 0.5
#: failed logins waiting their turn at most; more are answered 429 at once
MAX_WAITING_FAILURES = 64
#: the largest login form read
MAX_FORM_BYTES = 8192

_CREDENTIAL_KEY = web.RequestKey("shoal_credential", str)
_STILL_VALID_KEY: web.RequestKey[Callable[[], bool]] = web.RequestKey("shoal_still_valid")


def still_authorized(request: web.Request) -> bool:
    """Whether the credential ``request`` came with is still good: a long-lived response
    (the event stream) ends when its session expires or is logged out."""
    check = request.get(_STILL_VALID_KEY)
    return check is None or check()


def peer_certificate_ok(request: web.Request, check: CertificateCheck | None) -> bool:
    """Whether the request came over TLS with a client certificate the CA verified and
    ``check`` accepts (the context asks for certificates with CERT_OPTIONAL: a browser
    without one still gets the login page)."""
    if check is None or request.transport is None:
        return False
    ssl_object = request.transport.get_extra_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject):
        return False
    cert = ssl_object.getpeercert()
    return cert is not None and bool(cert) and check(dict(cert))


def _credential(request: web.Request, auth: DashboardAuth,
                certificate: CertificateCheck | None) -> Credential | None:  # fmt: skip
    if not auth.required:
        return "none"
    if auth.check_bearer(request.headers.get("Authorization")):
        return "bearer"
    if auth.check_session(request.cookies.get(auth.cookie_name)):
        return "cookie"
    if peer_certificate_ok(request, certificate):
        return "certificate"
    return None


def _safe_next(target: str | None) -> str:
    """Where to go after logging in: a path on this server, never another site."""
    # Browsers drop tabs and newlines from URLs ("/\t/evil" becomes "//evil") and read "\"
    # as "/": only printable ASCII without them, starting with one "/".
    if (not target or not target.startswith("/") or target.startswith("//")
            or any(not 33 <= ord(c) < 127 or c == "\\" for c in target)):  # fmt: skip
        return "/"
    return target


def _unauthenticated(request: web.Request) -> web.StreamResponse:
    wants_page = (request.method in ("GET", "HEAD") and not request.path.startswith("/api/")
                  and "text/html" in request.headers.get("Accept", ""))  # fmt: skip
    if wants_page:
        return _see_other("/login?next=" + quote(request.path_qs, safe=""))
    return web.json_response(
        {"error": "authentication required: send the cluster token as 'Authorization: Bearer"
                  " <token>', or log in at /login"},
        status=401, headers={"WWW-Authenticate": 'Bearer realm="shoal"'})  # fmt: skip


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>shoal dashboard: log in</title><link rel="icon" href="data:,">
<style>
body {{ font: 15px system-ui, sans-serif; background: #f4f5f7; color: #1d2330; margin: 0; }}
main {{ max-width: 24rem; margin: 12vh auto; background: #fff; padding: 2rem;
        border-radius: 8px; box-shadow: 0 1px 4px #0002; }}
h1 {{ font-size: 1.3rem; margin: 0 0 1rem; }} label {{ display: block; margin-bottom: .4rem; }}
input[type=password] {{ width: 100%; box-sizing: border-box; padding: .5rem; font: inherit; }}
button {{ margin-top: 1rem; padding: .5rem 1.2rem; font: inherit; }}
.error {{ color: #b00020; }} .note {{ color: #555; font-size: .9rem; }}
</style></head>
<body><main>
<h1>shoal dashboard</h1>
{message}
<form id="login" method="post" action="/login">
<label for="token">Cluster token</label>
<input type="password" id="token" name="token" autocomplete="current-password" required autofocus>
<input type="hidden" name="next" value="{next}">
<button type="submit">Log in</button>
</form>
<p class="note">{note}</p>
</main></body></html>
"""


def _login_page(auth: DashboardAuth, next_path: str, error: str = "",
                status: int = 200) -> web.Response:  # fmt: skip
    message = f'<p class="error" id="login-error">{html.escape(error)}</p>' if error else ""
    if auth.has_token:
        note = ("The token is the one the scheduler was started with (--token, SHOAL_TOKEN,"
                " or the token file it printed).")  # fmt: skip
    else:
        note = ("This dashboard has no token: open it with a client certificate of the"
                " cluster instead.")  # fmt: skip
    body = _PAGE.format(message=message, next=html.escape(next_path, quote=True), note=note)
    return web.Response(text=body, status=status, content_type="text/html",
                        headers={"Cache-Control": "no-store",
                                 "X-Frame-Options": "DENY",
                                 "Referrer-Policy": "no-referrer"})  # fmt: skip


async def _read_form(request: web.Request) -> dict[str, str] | web.Response:
    """The login form's fields, read with a bound; or the error page to answer with. Only
    the form encoding a browser uses for this page is taken."""
    if request.content_type != "application/x-www-form-urlencoded":
        return _error_page(f"the login form must be sent as application/x-www-form-urlencoded,"
                           f" not {request.content_type or 'nothing'}", 415)  # fmt: skip
    if (request.content_length or 0) > MAX_FORM_BYTES:
        return _error_page("the login form is too large", 413)
    body = await request.content.read(MAX_FORM_BYTES + 1)
    if len(body) > MAX_FORM_BYTES:
        return _error_page("the login form is too large", 413)
    try:
        fields = parse_qs(body.decode("utf-8", "surrogateescape"), max_num_fields=10)
    except ValueError as exc:
        return _error_page(f"bad login form: {exc}", 400)
    return {name: values[0] for name, values in fields.items()}


def _error_page(message: str, status: int) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _too_many() -> web.Response:
    return _error_page("too many failed logins at once; try again later", 429)


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


class LoginGuard:
    """The login of one dashboard: its middleware (`middleware`) and routes (`add_routes`),
    sharing one queue of failed attempts: wrong tokens, from the form or as a bearer header,
    wait their turn for one pause each, so a server answers at most 1/WRONG_TOKEN_DELAY
    guesses a second however many connections try; the right token never waits."""

    def __init__(self, auth: DashboardAuth, certificate: CertificateCheck | None = None) -> None:
        self.auth = auth
        self.certificate = certificate
        self._failures = asyncio.Lock()
        self._failures_waiting = 0

    async def failed(self, request: web.Request) -> bool:
        """Pause for a failed attempt, in turn; False (answer 429) when too many wait."""
        if self._failures_waiting >= MAX_WAITING_FAILURES:
            return False
        self._failures_waiting += 1
        try:
            async with self._failures:
                await asyncio.sleep(WRONG_TOKEN_DELAY)
        finally:
            self._failures_waiting -= 1
        logger.warning("dashboard: a wrong token was offered by %s", request.remote)
        return True

    @property
    def middleware(self) -> Any:
        """Lets through only authenticated requests (see the module doc)."""

        @web.middleware
        async def require_login(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.path in OPEN_PATHS:
                response: web.StreamResponse = await handler(request)
                return response
            credential = _credential(request, self.auth, self.certificate)
            if credential is None:
                if "Authorization" in request.headers and not await self.failed(request):
                    return _too_many()
                return _unauthenticated(request)
            request[_CREDENTIAL_KEY] = credential
            if credential == "cookie":
                session = request.cookies.get(self.auth.cookie_name)
                request[_STILL_VALID_KEY] = lambda: self.auth.check_session(session)
            response = await handler(request)
            return response

        return require_login

    def add_routes(self, app: web.Application) -> None:
        """``GET``/``POST /login``, ``POST /logout`` and ``GET /api/session`` on ``app``."""
        auth = self.auth

        async def login_form(request: web.Request) -> web.Response:
            return _login_page(auth, _safe_next(request.query.get("next")))

        async def login(request: web.Request) -> web.StreamResponse:
            form = await _read_form(request)
            if isinstance(form, web.Response):
                return form
            token, target = form.get("token"), _safe_next(form.get("next") or "/")
            if token is None or not auth.check_token(token):
                if not await self.failed(request):
                    return _too_many()
                why = "Wrong token." if auth.has_token else "This dashboard takes no token."
                return _login_page(auth, target, why, status=401)
            response = _see_other(target)
            response.set_cookie(auth.cookie_name, auth.new_session(),
                                max_age=int(auth.session_ttl), path="/", httponly=True,
                                samesite="Strict", secure=auth.secure)  # fmt: skip
            return response

        async def logout(request: web.Request) -> web.StreamResponse:
            auth.revoke(request.cookies.get(auth.cookie_name))
            response = _see_other("/login")
            response.del_cookie(auth.cookie_name, path="/", httponly=True, samesite="Strict",
                                secure=auth.secure)  # fmt: skip
            return response

        async def session(request: web.Request) -> web.Response:
            credential = request.get(_CREDENTIAL_KEY, "none")
            return web.json_response({"required": auth.required, "credential": credential})

        app.router.add_get("/login", login_form)
        app.router.add_post("/login", login)
        app.router.add_post("/logout", logout)
        app.router.add_get("/api/session", session)
