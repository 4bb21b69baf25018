"""API versioning: /api/<version>/... side by side, with the latest one as the default.

- `versioned_blueprint(name, import_name, version)` makes a flask-smorest
  blueprint mounted at /api/<version>.
- `@latest_version` marks a view (function or MethodView) as reachable
  without a version: /api/<path> answers 308 to /api/<LATEST_API_VERSION>/<path>,
  keeping the method and body.
- `VersionedAPI().init_app(app, api)` then `register_version(version, blueprint)`
  registers each version; an unknown version is a JSON 404 listing the supported
  ones, and every response says which version served it (API-Version header).
  Versions listed in DEPRECATED_API_VERSIONS (`v1=2027-06-30`, the sunset
  date) also carry Deprecation, Sunset and successor Link headers.
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


@dataclass
class VersioningState:
    api: Api
    latest: str
    sunsets: dict[str, date | None]
    versions: dict[str, str] = field(default_factory=dict)  # blueprint name -> version


class VersionedAPI:
    """The versioning extension; its state lives in app.extensions["versioned_api"]."""

    def __init__(self, app: Flask | None = None, api: Api | None = None):
        if app is not None:
            self.init_app(app, api)

    def init_app(self, app: Flask, api: Api) -> None:
        sunsets = {
            version: date.fromisoformat(value) if value else None
            for version, value in app.config.get("DEPRECATED_API_VERSIONS", {}).items()
        }
        app.extensions[EXTENSION_KEY] = VersioningState(
            api=api, latest=app.config["LATEST_API_VERSION"], sunsets=sunsets
        )
        app.before_request(self._route_unversioned_or_unknown)
        app.after_request(self._add_version_headers)

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
        error = request.routing_exception
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

    def _add_version_headers(self, response):
        state = self.state()
        version = state.versions.get(request.blueprint or "")
        if version is None:
            return response
        response.headers[VERSION_HEADER] = version
        if version in state.sunsets:
            response.headers["Deprecation"] = "true"
            sunset = state.sunsets[version]
            if sunset is not None:
                moment = datetime(sunset.year, sunset.month, sunset.day, tzinfo=UTC)
                response.headers["Sunset"] = format_datetime(moment, usegmt=True)
            response.headers["Link"] = f'<{API_PREFIX}/{state.latest}/>; rel="successor-version"'
        return response
