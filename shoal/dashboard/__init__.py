"""The dashboard: a web page, a JSON API and Prometheus ``/metrics``, served by the scheduler.

  http.py        an aiohttp app on the server's own event loop: bound at once (so its URL is
                 known), started in the background (aiohttp is imported off the loop)
  api.py         the JSON documents, built from the scheduler's state (never per task per
                 second: counts come from `SchedulerState.groups` and `transition_counts`)
  app.py         the scheduler's app: routes, the server-sent-event stream, static files
  metrics.py     Prometheus collectors for the scheduler and for each worker
  jobs.py        what the page and ``/metrics`` show of an attached `shoal.jobs` queue
  worker_app.py  each worker's small app: ``/metrics``, ``/health``, ``/api/info``, ``/api/logs``
  auth.py        when a login is required (token, TLS, beyond loopback), tokens compared in
                 constant time, HMAC session values, the refusal of an open dashboard
  login.py       the middleware in front of both apps, the login page, logout
  tls.py         the HTTPS context from the server's `shoal.Security`
  static/        the single page (plain JS and CSS, no build step, nothing from a CDN)

The routes are documented in docs/dashboard.md, the login and HTTPS in
docs/dashboard-security.md. Everything here is read-only: the dashboard changes nothing in
the cluster.
"""
