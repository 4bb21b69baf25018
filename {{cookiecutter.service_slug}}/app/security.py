"""Protections every response gets, whatever features are on.

- Security headers: the API serves JSON only, so the browser is told never to
  sniff a different type, frame it, run anything from it or leak its URL.
- Client address: behind reverse proxies, `request.remote_addr` is taken from
  X-Forwarded-For, but only the hops that TRUSTED_PROXY_COUNT proxies appended:
  with the default 0 the header is ignored, so a client cannot pick its own
  address (which logs and rate limits rely on).
- CORS: off unless CORS_ORIGINS lists the browser origins allowed to call the
  API; a service called by other services needs none.

The request body size limit is Flask's MAX_CONTENT_LENGTH (413 in the JSON
error shape).
"""

from __future__ import annotations

from flask import Flask, Response
from flask_cors import CORS
from werkzeug.middleware.proxy_fix import ProxyFix

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}

# Headers a browser script may read on a cross-origin response.
CORS_EXPOSED_HEADERS = [
    "Location",
    "Retry-After",
    "X-Request-ID",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "API-Version",
    "Deprecation",
    "Sunset",
    "Link",
]


#: SECURITY_HEADERS with each name lowercased once, for the check against a response's own.
_SECURITY_HEADERS_BY_KEY = tuple(
    (name.lower(), name, value) for name, value in SECURITY_HEADERS.items()
)


def add_security_headers(response: Response) -> Response:
    """Each security header the response does not set itself (a view may choose its own CSP, say).

    The response's header names are read once: `Headers.setdefault` would
    search them all, lowercasing each, for every one of the five (about 200
    Python calls on every response, more than the headers are worth).
    """
    headers = response.headers
    present = {name.lower() for name, _ in headers}
    for key, name, value in _SECURITY_HEADERS_BY_KEY:
        if key not in present:
            headers.add(name, value)
    return response


def init_app(app: Flask) -> None:
    app.after_request(add_security_headers)
    proxies = app.config.get("TRUSTED_PROXY_COUNT", 0)
    if proxies < 0:
        raise ValueError(f"TRUSTED_PROXY_COUNT must be 0 or more, got {proxies}")
    if proxies:
        # X-Forwarded-Proto too, so URLs the service builds (Location) keep https.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=proxies, x_proto=proxies)
    origins = app.config.get("CORS_ORIGINS") or []
    if origins:
        CORS(
            app,
            resources={r"/api/*": {"origins": origins}},
            expose_headers=CORS_EXPOSED_HEADERS,
            supports_credentials=False,
            max_age=600,
        )
