"""API versioning: /api/<version>/... side by side, with the latest one as the default.

- `versioned_blueprint(name, import_name, version)` makes a flask-smorest
  blueprint mounted at /api/<version>.
- `@latest_version` marks a view (function or MethodView) as reachable
  without a version: /api/<path> answers 308 to /api/<LATEST_API_VERSION>/<path>,
  keeping the method and body.
- `VersionedAPI().init_app(app, api)` then `register_version(version, blueprint)`
  registers each version; an unknown version is a JSON 404 listing the supported
  ones, and every response says which version served it (API-Version header).
  Versions listed in DEPRECATED_API_VERSIONS (`v1=2026-01-15/2027-06-30`:
  deprecated since / sunset, which may be left empty) also carry
  `Deprecation: @<epoch>` (RFC 9745), `Sunset` (RFC 8594) and a
  `Link: <...>; rel="successor-version"` to the same resource in the next
  version up, when that version serves it. A Link the response already has
  (pagination, say) is kept beside it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email.utils import format_datetime

from flask import Flask, current_app, redirect, request
from flask_smorest import Api, Blueprint, abort
from werkzeug.exceptions import HTTPException, NotFound

EXTENSION_KEY = "versioned_api"
API_PREFIX = "/api"
VERSION_PATTERN = re.compile(r"^v[1-9][0-9]*$")
VERSION_HEADER = "API-Version"


class VersionedBlueprint(Blueprint):
    """A flask-smorest blueprint that knows which API version it serves."""

    def __init__(self, name: str, import_name: str, version: str, **kwargs):
        if not VERSION_PATTERN.match(version):
            raise ValueError(f"API version must look like 'v1', got {version!r}")
        kwargs.setdefault("url_prefix", f"{API_PREFIX}/{version}")
        kwargs.setdefault("description", f"API {version}")
        super().__init__(name, import_name, **kwargs)
        self.api_version = version


def versioned_blueprint(name: str, import_name: str, version: str, **kwargs) -> VersionedBlueprint:
    return VersionedBlueprint(name, import_name, version, **kwargs)


def latest_version(view):
    """Mark a view as served by the latest API version (reachable unversioned)."""
    view.latest_version = True
    return view


def is_marked_latest(view) -> bool:
    view_class = getattr(view, "view_class", None)
    return bool(getattr(view, "latest_version", False) or getattr(view_class, "latest_version", False))


@dataclass(frozen=True)
class Deprecation:
    """When a version was (or will be) deprecated, and when it goes away, if decided."""

    since: date
    sunset: date | None = None

    @classmethod
    def parse(cls, version: str, value: str) -> Deprecation:
        """`2026-01-15/2027-06-30`, or `2026-01-15/` while no sunset is decided.

        The slash is required: a bare date used to mean the sunset, and reading
        it as the deprecation date now would change its meaning silently.
        """
        since, slash, sunset = value.partition("/")
        try:
            deprecation = cls(date.fromisoformat(since), date.fromisoformat(sunset) if sunset else None)
        except ValueError:
            deprecation = None
        if not slash:
            deprecation = None
        if deprecation is None or (deprecation.sunset and deprecation.sunset < deprecation.since):
            raise ValueError(
                f"DEPRECATED_API_VERSIONS: {version}={value} is not <deprecated since>/[<sunset>] "
                f"with ISO dates, the sunset not before the deprecation (e.g. {version}=2026-01-15/2027-06-30)"
            )
        return deprecation

    @staticmethod
    def http_date(day: date) -> datetime:
        return datetime(day.year, day.month, day.day, tzinfo=UTC)


@dataclass
class VersioningState:
    api: Api
    latest: str
    deprecations: dict[str, Deprecation]
    versions: dict[str, str] = field(default_factory=dict)  # blueprint name -> version


class VersionedAPI:
    """The versioning extension; its state lives in app.extensions["versioned_api"]."""

    def __init__(self, app: Flask | None = None, api: Api | None = None):
        if app is not None:
            self.init_app(app, api)

    def init_app(self, app: Flask, api: Api) -> None:
        deprecations = {
            version: Deprecation.parse(version, value)
            for version, value in app.config.get("DEPRECATED_API_VERSIONS", {}).items()
        }
        state = VersioningState(
            api=api, latest=app.config["LATEST_API_VERSION"], deprecations=deprecations
        )
        app.extensions[EXTENSION_KEY] = state
        app.before_request(self._route_unversioned_or_unknown)

        def add_version_headers(response):
            # This app's state, bound here: looking it up through current_app costs every response.
            return self._add_version_headers(response, state)

        app.after_request(add_version_headers)

    @staticmethod
    def state(app: Flask | None = None) -> VersioningState:
        return (app or current_app).extensions[EXTENSION_KEY]

    def register_version(self, version: str, blueprint: Blueprint, app: Flask | None = None) -> None:
        """Serve `blueprint` as API `version` (and document it in the OpenAPI file)."""
        state = self.state(app)
        if version in state.versions.values():
            raise ValueError(f"API version {version} is already registered")
        state.api.register_blueprint(blueprint)
        state.versions[blueprint.name] = version

    def supported_versions(self, app: Flask | None = None) -> list[str]:
        return sorted(set(self.state(app).versions.values()), key=lambda v: int(v[1:]))

    def _route_unversioned_or_unknown(self):
        """Runs before routing errors surface: redirect or explain instead of a bare 404."""
        error = request._get_current_object().routing_exception  # every request: one lookup
        if not isinstance(error, NotFound) or not request.path.startswith(f"{API_PREFIX}/"):
            return None
        state = self.state()
        first, _, rest = request.path[len(API_PREFIX) + 1 :].partition("/")
        if VERSION_PATTERN.match(first):
            supported = self.supported_versions()
            if first not in supported:
                abort(
                    404,
                    code="unknown_api_version",
                    message=f"API version {first} does not exist.",
                    details={"requested": first, "supported_versions": supported},
                )
            return None
        target = f"{API_PREFIX}/{state.latest}/{first}" + (f"/{rest}" if rest else "")
        adapter = current_app.create_url_adapter(request)
        try:
            endpoint, _ = adapter.match(target, method=request.method)
        except HTTPException:
            return None
        if not is_marked_latest(current_app.view_functions.get(endpoint)):
            return None
        query = request.query_string.decode("latin-1")
        return redirect(request.script_root + target + (f"?{query}" if query else ""), code=308)

    def _add_version_headers(self, response, state: VersioningState):
        version = state.versions.get(request._get_current_object().blueprint or "")
        if version is None:
            return response
        # Only this hook writes API-Version: add it, without searching the headers for an old one.
        response.headers.add(VERSION_HEADER, version)
        deprecation = state.deprecations.get(version)
        if deprecation is not None:
            since = Deprecation.http_date(deprecation.since)
            response.headers["Deprecation"] = f"@{int(since.timestamp())}"
            if deprecation.sunset is not None:
                response.headers["Sunset"] = format_datetime(Deprecation.http_date(deprecation.sunset), usegmt=True)
            successor = self._successor_path(version)
            if successor is not None:
                response.headers.add("Link", f'<{successor}>; rel="successor-version"')
        return response

    def _successor_path(self, version: str) -> str | None:
        """This request's path in the next version up, if that version serves it."""
        newer = [candidate for candidate in self.supported_versions() if int(candidate[1:]) > int(version[1:])]
        prefix = f"{API_PREFIX}/{version}"
        if not newer or not request.path.startswith(prefix):
            return None
        path = f"{API_PREFIX}/{newer[0]}{request.path[len(prefix) :]}"
        try:
            current_app.create_url_adapter(request).match(path, method=request.method)
        except HTTPException:  # not served there (or redirected): no successor to point at
            return None
        return request.script_root + path
