"""One blueprint per API version, each serving the same resource views."""

from app.api import register_{{ cookiecutter.resource_name }}_routes
from common_utils.versioning import VersionedBlueprint, latest_version, versioned_blueprint


def create_api_blueprint(version: str) -> VersionedBlueprint:
    """Build the blueprint for /api/<version>.

    To change the API incompatibly, copy the views into a new module for the
    new version and register both versions side by side in create_app.
    """
    blueprint = versioned_blueprint(f"api_{version}", __name__, version)
    register_{{ cookiecutter.resource_name }}_routes(blueprint, view_decorators=[latest_version])
    return blueprint
