"""Health endpoints for load balancers, Kubernetes probes and Consul checks."""

from flask import Blueprint, current_app, jsonify

from common_utils.health import run_readiness_checks

health = Blueprint("health", __name__)


@health.get("/health")
def liveness():
    """Liveness: the process is up and answering. Never touches dependencies."""
    return jsonify(status="healthy", service=current_app.config["SERVICE_NAME"])


@health.get("/health/ready")
def readiness():
    """Readiness: the database (and each enabled feature's dependency) is usable."""
    ready, checks = run_readiness_checks(current_app)
    body = {
        "status": "ready" if ready else "not_ready",
        "service": current_app.config["SERVICE_NAME"],
        "checks": checks,
    }
    return jsonify(body), 200 if ready else 503
