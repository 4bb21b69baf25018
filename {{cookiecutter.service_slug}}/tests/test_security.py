"""Secure configuration and the protections every response gets."""

from __future__ import annotations

from pathlib import Path

import pytest
from flask import request

import config
from app import create_app
from config import PLACEHOLDER_SECRETS, Config, InsecureConfigError, url_password

PROJECT = Path(__file__).resolve().parent.parent
ORIGIN = "https://app.example.com"


def local_defaults(monkeypatch) -> Config:
    """The settings a local run gets (ENVIRONMENT=test), whatever the test set around it."""
    with monkeypatch.context() as patch:
        patch.setenv("ENVIRONMENT", "test")
        return Config()


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """Config as a fresh deployment sees it: no .env file, no credential variables, no ENVIRONMENT."""
    monkeypatch.setattr(config, "BASE_DIR", tmp_path)
    names = [*local_defaults(monkeypatch).secrets, "ENVIRONMENT", "RATELIMIT_ENABLED"]
    for name in names:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(f"{name}_FILE", raising=False)
    return monkeypatch


REAL_VALUES = {
    "SECRET_KEY": "a-long-random-value-from-the-secret-store-0123456789",
    "DATABASE_URL": "postgresql://app:N0t-a-default-Pa55word@db:5432/service",
    "RATELIMIT_STORAGE_URI": "redis://:N0t-a-default-Pa55word@redis:6379/0",
}


def production_ready(monkeypatch) -> None:
    """Give every credential a real-looking value, keeping each one's form (URL or not)."""
    for name, value in local_defaults(monkeypatch).secrets.items():
        if name in REAL_VALUES:
            value = REAL_VALUES[name]
        elif url_password(value) is not None:
            value = value.replace(f":{url_password(value)}@", ":N0t-a-default-Pa55word@", 1)
        elif value in PLACEHOLDER_SECRETS:
            value = "a-long-random-value-from-the-secret-store"
        monkeypatch.setenv(name, value)


def expected_refusals(monkeypatch) -> list[str]:
    """What a production start with nothing set must name: every credential with a local default."""
    defaults = local_defaults(monkeypatch).secrets
    return [
        name
        for name, value in defaults.items()
        if name in ("SECRET_KEY", "DATABASE_URL", "RATELIMIT_STORAGE_URI")
        or value in PLACEHOLDER_SECRETS
        or url_password(value) in PLACEHOLDER_SECRETS
    ]


def test_security_headers_on_every_response(client, collection_url):
    """JSON answers, errors included, tell browsers not to sniff, frame, run or leak anything."""
    for response in (
        client.get("/health"),
        client.get(collection_url),
        client.get("/no/such/path"),
        client.delete("/health"),
    ):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Content-Security-Policy"] == "default-src 'none'; frame-ancestors 'none'"
        assert response.headers["Referrer-Policy"] == "no-referrer"


def test_a_views_own_security_header_is_kept(make_app):
    """A header the view set itself, in any case, wins over the default and is not doubled; the rest still come."""
    app = make_app()

    @app.get("/framed")
    def framed():
        return {}, 200, {"x-frame-options": "SAMEORIGIN"}

    response = app.test_client().get("/framed")
    assert response.headers.getlist("X-Frame-Options") == ["SAMEORIGIN"]
    assert response.headers.getlist("X-Content-Type-Options") == ["nosniff"]
    assert response.headers["Cross-Origin-Resource-Policy"] == "same-origin"


def test_request_body_size_is_limited(make_app, collection_url):
    """A body over MAX_CONTENT_LENGTH is refused with a JSON 413 before any view reads it."""
    client = make_app(MAX_CONTENT_LENGTH=64).test_client()
    response = client.post(collection_url, json={"name": "x" * 100, "quantity": 1, "unit_price": "1"})
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "payload_too_large"


def test_cors_is_off_unless_configured(client, collection_url):
    """Without CORS_ORIGINS no browser origin is allowed, preflight included."""
    response = client.get(collection_url, headers={"Origin": ORIGIN})
    assert "Access-Control-Allow-Origin" not in response.headers
    preflight = client.options(
        collection_url, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    )
    assert "Access-Control-Allow-Origin" not in preflight.headers


def test_cors_allows_only_the_configured_origins(make_app, collection_url):
    """With CORS_ORIGINS set, those origins (and no others) may call the API and read its headers."""
    client = make_app(CORS_ORIGINS=[ORIGIN]).test_client()
    allowed = client.get(collection_url, headers={"Origin": ORIGIN})
    assert allowed.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "X-Request-ID" in allowed.headers["Access-Control-Expose-Headers"]
    assert "Access-Control-Allow-Credentials" not in allowed.headers
    preflight = client.options(
        collection_url, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    )
    assert preflight.headers["Access-Control-Allow-Origin"] == ORIGIN
    other = client.get(collection_url, headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


@pytest.mark.parametrize(
    ("proxies", "expected"),
    [(0, "10.0.0.2"), (1, "203.0.113.7"), (2, "198.51.100.1")],
)
def test_client_address_trusts_only_the_configured_proxies(make_app, proxies, expected):
    """X-Forwarded-For is believed only for the last TRUSTED_PROXY_COUNT hops; 0 ignores it."""
    app = make_app(TRUSTED_PROXY_COUNT=proxies)

    @app.get("/whoami")
    def whoami():
        return {"address": request.remote_addr}

    response = app.test_client().get(
        "/whoami",
        headers={"X-Forwarded-For": "6.6.6.6, 198.51.100.1, 203.0.113.7"},
        environ_base={"REMOTE_ADDR": "10.0.0.2"},
    )
    assert response.get_json() == {"address": expected}


def test_negative_proxy_count_is_refused(make_app):
    """TRUSTED_PROXY_COUNT below 0 stops start-up with a message naming it."""
    with pytest.raises(ValueError, match="TRUSTED_PROXY_COUNT"):
        make_app(TRUSTED_PROXY_COUNT=-1)


def test_credentials_can_come_from_files(clean_env, tmp_path):
    """SECRET_KEY_FILE and DATABASE_URL_FILE (Docker/Kubernetes secrets) are read, trailing newline dropped."""
    clean_env.setenv("ENVIRONMENT", "test")  # the values are short, which only production refuses
    secret_file = tmp_path / "secret_key"
    mounted = "from-a-mounted-secret"
    secret_file.write_text(mounted + "\n")
    url_file = tmp_path / "database_url"
    url_file.write_text("sqlite:////tmp/from-file.db\n")
    clean_env.setenv("SECRET_KEY_FILE", str(secret_file))
    clean_env.setenv("DATABASE_URL_FILE", str(url_file))
    settings = Config()
    assert mounted == settings.SECRET_KEY
    assert settings.SQLALCHEMY_DATABASE_URI == "sqlite:////tmp/from-file.db"


def test_variable_and_file_together_are_refused(clean_env, tmp_path):
    """Setting both SECRET_KEY and SECRET_KEY_FILE is an error naming both, not a silent choice."""
    secret_file = tmp_path / "secret_key"
    secret_file.write_text("one")
    clean_env.setenv("SECRET_KEY_FILE", str(secret_file))
    clean_env.setenv("SECRET_KEY", "two")
    with pytest.raises(InsecureConfigError, match="SECRET_KEY and SECRET_KEY_FILE"):
        Config()


def test_unreadable_secret_file_is_refused(clean_env, tmp_path):
    """A <NAME>_FILE that cannot be read stops start-up with the variable and the path."""
    clean_env.setenv("SECRET_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(InsecureConfigError, match="SECRET_KEY_FILE: cannot read"):
        Config()


@pytest.mark.parametrize("environment", [None, "", "Production", "prod", "staging", "PRODUCTION "])
def test_anything_but_development_or_test_is_production(clean_env, environment):
    """Unset, empty or any other name is production: the local defaults are refused, each one named in one line."""
    if environment is not None:
        clean_env.setenv("ENVIRONMENT", environment)
    with pytest.raises(InsecureConfigError) as refusal:
        Config()
    message = str(refusal.value)
    assert "\n" not in message
    expected = expected_refusals(clean_env)
    assert {"SECRET_KEY", "DATABASE_URL"} <= set(expected)
    for name in expected:
        assert f"{name} " in message, (name, message)
    with pytest.raises(InsecureConfigError):
        create_app()  # the service itself, not only its settings


@pytest.mark.parametrize("environment", ["development", "test", "Development", " TEST "])
def test_development_and_test_start_with_local_defaults(clean_env, environment):
    """Only ENVIRONMENT development or test (any case) gets the local defaults, so `make run` needs no setup."""
    clean_env.setenv("ENVIRONMENT", environment)
    settings = Config()
    assert settings.SECRET_KEY == config.LOCAL_ONLY_SECRET_KEY
    assert settings.SQLALCHEMY_DATABASE_URI == config.DEFAULT_DATABASE_URL


def test_production_starts_with_real_values(clean_env):
    """With a real value for every credential, production starts (and so does an unset ENVIRONMENT)."""
    production_ready(clean_env)
    assert Config().ENVIRONMENT == "production"
    clean_env.setenv("ENVIRONMENT", "staging")
    assert Config().ENVIRONMENT == "staging"


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("SECRET_KEY", "", "SECRET_KEY is not set"),
        ("SECRET_KEY", "x", "SECRET_KEY is too short"),
        ("SECRET_KEY", "k" * 31, "SECRET_KEY is too short"),
        ("SECRET_KEY", "change-me", "SECRET_KEY is a local-only default"),
        ("SECRET_KEY", config.LOCAL_ONLY_SECRET_KEY, "SECRET_KEY is not set"),
        ("DATABASE_URL", config.DEFAULT_DATABASE_URL, "DATABASE_URL is not set"),
        ("DATABASE_URL", "postgresql://app:app@db:5432/service", "DATABASE_URL has a local-only"),
        ("DATABASE_URL", "mysql://root:root@db:3306/service", "DATABASE_URL has a local-only"),
    ],
)
def test_production_refuses_each_weak_setting(clean_env, name, value, reason):
    """One weak setting among real ones is refused by name, with what is wrong with it."""
    production_ready(clean_env)
    clean_env.setenv("ENVIRONMENT", "production")
    clean_env.setenv(name, value)
    with pytest.raises(InsecureConfigError, match=reason) as refusal:
        Config()
    assert "\n" not in str(refusal.value)
    assert len(str(refusal.value).split("): ", 1)[1].split("; ")) == 1  # that one only


def test_production_refuses_every_credential_left_at_a_local_default(clean_env):
    """Each credential left at its laptop default (guest AMQP, memory:// limits, ...) is refused, naming it."""
    defaults = local_defaults(clean_env).secrets
    production_ready(clean_env)
    clean_env.setenv("ENVIRONMENT", "production")
    checked = []
    for name in expected_refusals(clean_env):
        with clean_env.context() as patch:
            patch.setenv(name, defaults[name])
            with pytest.raises(InsecureConfigError, match=rf"\b{name} (is|has) "):
                Config()
        checked.append(name)
    assert checked == expected_refusals(clean_env)
    if "RATELIMIT_STORAGE_URI" in defaults:  # per-process counters are fine when nothing is limited
        clean_env.setenv("RATELIMIT_STORAGE_URI", "memory://")
        clean_env.setenv("RATELIMIT_ENABLED", "false")
        Config()


def carries_no_secret(value: str) -> bool:
    """A placeholder, or a URL without a password or with a placeholder one."""
    if "://" in value:
        return url_password(value) in (None, *PLACEHOLDER_SECRETS)
    return value in PLACEHOLDER_SECRETS


def test_env_example_holds_placeholders_only():
    """.env.example never carries a real secret, and .env is ignored by git."""
    credentials = set(Config().secrets)
    seen = set()
    for line in (PROJECT / ".env.example").read_text().splitlines():
        assignment = line.lstrip("# ").strip()
        if "=" not in assignment or " " in assignment.split("=", 1)[0]:
            continue
        name, value = assignment.split("=", 1)
        if name in credentials:
            seen.add(name)
            assert carries_no_secret(value), line
    assert "SECRET_KEY" in seen
    ignored = (PROJECT / ".gitignore").read_text().splitlines()
    assert ".env" in ignored
