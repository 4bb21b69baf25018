"""One blueprint per API version, each serving the same resource views."""

from app.api import register_{{ cookiecutter.resource_name }}_routes
from common_utils.versioning import VersionedBlueprint, latest_version, versioned_blueprint


def create_api_blueprint(version: str, operation_suffix: str = "") -> VersionedBlueprint:
    """Build the blueprint for /api/<version>.

    To change the API incompatibly, copy the views into a new module for the
    new version and register both versions side by side in create_app. Two
    versions serving these same views need different operationIds: pass an
    `operation_suffix` ("_v1") for one of them.
    """
    blueprint = versioned_blueprint(f"api_{version}", __name__, version)
    register_{{ cookiecutter.resource_name }}_routes(
        blueprint, view_decorators=[latest_version], operation_suffix=operation_suffix
    )
    return blueprint
