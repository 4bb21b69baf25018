"""Checks of one rendered project as a whole, with expectations taken from its own code.

The post-generation hook's FEATURES table decides which files a project keeps
and which compose services it gets. Checking a render against that same table
proves nothing when the table is wrong, so nothing here reads it: the
expectations come from what the rendered project itself imports, reads and
connects to.

- imports: every module is reachable from an entry point (a file a command
  runs: main.py, gunicorn.conf.py, migrations, tests, `python -m ...`), and
  every import of the project's own modules names a module and a name that
  exist;
- docker-compose.yml: every host a service's environment points at is a
  compose service with a healthcheck that it waits for, every backing service
  is used by someone, every bind-mounted file exists;
- the initial migration creates exactly the tables the models declare;
- the CI workflow requires its services, and gives the tests every service
  URL they read.

Each function takes a `Project` (tests/rendering.py) and returns a list of
problems, so tests/test_harness.py can show each one catching a broken render.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import PurePosixPath
from urllib.parse import urlsplit

import yaml

from tests.content_checks import is_requirements_file, requirement_lines

#: Library settings read by the libraries themselves, not by the project's code.
LIBRARY_SETTINGS = re.compile(r"^OTEL_[A-Z_]+$")
PYTHON_M = re.compile(r"python3?\"?,?\s*\"?-m\"?,?\s*\"?([A-Za-z_][\w.]*)")
PYTHON_SCRIPT = re.compile(r"python3?\"?,?\s+\"?([\w./-]+\.py)\b")
SETTING_NAME = re.compile(r"[\"']([A-Z][A-Z0-9_]{2,})[\"']")
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


# --- the import graph ---------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    module: str  # absolute dotted name
    names: tuple[str, ...]  # for `from module import a, b`; () for `import module`
    optional: bool  # inside try/except ImportError, or a dynamic find_spec/import_module
    line: int
    at_load: bool = True  # runs when the module is loaded (not inside a function)


@dataclass
class ModuleInfo:
    """What one Python source defines and imports (computed once per distinct content)."""

    imports: list[Import] = field(default_factory=list)
    bound: set[str] = field(default_factory=set)  # names bound at module level
    open_namespace: bool = False  # a star import or module __getattr__: any name may exist
    tablenames: set[str] = field(default_factory=set)
    created_tables: set[str] = field(default_factory=set)
    strings: set[str] = field(default_factory=set)


def module_name(path: str) -> str | None:
    """The dotted module name of a project file, or None when it cannot be imported by name."""
    parts = list(PurePosixPath(path).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if not parts or not all(part.isidentifier() for part in parts):
        return None
    return ".".join(parts)


def _handler_catches_import_errors(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(t, ast.Name) and t.id in IMPORT_ERRORS for t in types)


def _suppresses_import_errors(expression) -> bool:
    """`contextlib.suppress(ImportError)` and the like."""
    if not isinstance(expression, ast.Call):
        return False
    name = expression.func.attr if isinstance(expression.func, ast.Attribute) else getattr(expression.func, "id", "")
    return name == "suppress" and any(isinstance(arg, ast.Name) and arg.id in IMPORT_ERRORS for arg in expression.args)


@cache
def analyse(source: str, package: str) -> ModuleInfo:
    """Imports, module-level names, tables and string constants of one source file."""
    tree = ast.parse(source)
    info = ModuleInfo()

    def resolve(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = package.split(".") if package else []
        base = base[: len(base) - node.level + 1] if node.level > 1 else base
        return ".".join([*base, *([node.module] if node.module else [])])

    def visit(node, optional: bool, module_level: bool, in_body: bool = True):
        if isinstance(node, ast.With) and any(_suppresses_import_errors(item.context_expr) for item in node.items):
            for child in node.body:
                visit(child, True, module_level, in_body)
            return
        if isinstance(node, ast.Try):
            guarded = optional or any(_handler_catches_import_errors(h) for h in node.handlers)
            for child in node.body:
                visit(child, guarded, module_level, in_body)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, optional, module_level, in_body)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                info.imports.append(Import(alias.name, (), optional, node.lineno, in_body))
                if module_level:
                    info.bound.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            names = tuple(alias.name for alias in node.names)
            info.imports.append(Import(resolve(node), names, optional, node.lineno, in_body))
            if module_level:
                if "*" in names:
                    info.open_namespace = True
                info.bound.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Call):
            # importlib.import_module("x") / importlib.util.find_spec("x"): a dynamic, optional import.
            target = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            first = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else None
            if target in {"import_module", "find_spec"} and isinstance(first, str):
                info.imports.append(Import(first, (), True, node.lineno))
            if target == "create_table" and isinstance(first, str):
                info.created_tables.add(first)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            info.strings.add(node.value)
        if module_level:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                info.bound.add(node.name)
                if node.name == "__getattr__":
                    info.open_namespace = True
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for name in ast.walk(target):
                        if isinstance(name, ast.Name):
                            info.bound.add(name.id)
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                names = [t.id for t in getattr(item, "targets", []) if isinstance(t, ast.Name)]
                if "__tablename__" in names and isinstance(item.value, ast.Constant):
                    info.tablenames.add(item.value.value)
        # Statements nested in module-level if/with/for/try still bind module names.
        nested_module_level = module_level and not isinstance(
            node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
        )
        runs_later = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, optional, nested_module_level, in_body and not runs_later)

    for statement in tree.body:
        visit(statement, False, True)
    return info


def python_files(project) -> dict[str, str]:
    return {path: decoded(data) for path, data in project.files.items() if path.endswith(".py")}


@cache
def decoded(data: bytes) -> str:
    return data.decode("utf-8")


def project_modules(project) -> dict[str, str]:
    """Dotted module name -> file, for every importable Python file of the project."""
    modules = {}
    for path in python_files(project):
        name = module_name(path)
        if name is not None:
            modules[name] = path
    return modules


def first_party_roots(project) -> set[str]:
    return {name.split(".")[0] for name in project_modules(project)}


def entry_points(project) -> list[str]:
    """Files a command runs directly: the service, gunicorn, migrations, pytest, `python -m`."""
    entries = [
        path
        for path in python_files(project)
        if path in {"main.py", "gunicorn.conf.py", "migrations/env.py", "tests/conftest.py"}
        or path.startswith("migrations/versions/")
        or (path.startswith("tests/") and PurePosixPath(path).name.startswith("test_"))
    ]
    modules = project_modules(project)
    for command_module in python_m_modules(project):
        if command_module in modules:
            entries.append(modules[command_module])
    entries += [script for script in python_scripts(project) if script in project.files]
    return entries


def python_scripts(project) -> set[str]:
    """Files run as `python path/to/file.py` by a command (Dockerfile, Makefile, manifests, ...)."""
    return {
        match.removeprefix("./")
        for path, data in project.files.items()
        if not path.endswith(".py")
        for match in commands_in(data)[1]
    }


@cache
def commands_in(data: bytes) -> tuple[frozenset[str], frozenset[str]]:
    """(`python -m` modules, `python file.py` scripts) named in one non-Python file."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return frozenset(), frozenset()
    return frozenset(PYTHON_M.findall(text)), frozenset(PYTHON_SCRIPT.findall(text))


def python_m_modules(project) -> set[str]:
    """Modules named by `python -m <module>` in any text file (Dockerfile, manifests, Makefile, ...)."""
    return {match for path, data in project.files.items() if not path.endswith(".py") for match in commands_in(data)[0]}


def package_of(path: str) -> str:
    name = module_name(path) or ""
    return name if path.endswith("__init__.py") else name.rpartition(".")[0]


def infos(project) -> dict[str, ModuleInfo]:
    return {path: analyse(source, package_of(path)) for path, source in python_files(project).items()}


def import_problems(project) -> list[str]:
    """Every first-party import resolves, every module is reachable from an entry point."""
    modules = project_modules(project)
    roots = first_party_roots(project)
    details = infos(project)
    problems = []
    edges: dict[str, set[str]] = {path: set() for path in details}

    def module_file(name: str) -> str | None:
        return modules.get(name)

    # A module the code looks up before importing (find_spec, import_module) may be absent.
    may_be_absent = {item.module for info in details.values() for item in info.imports if item.optional}
    for path, info in details.items():
        for item in info.imports:
            if item.module.split(".")[0] not in roots:
                continue
            # Importing a.b.c runs a/__init__.py and a/b/__init__.py too.
            parts = item.module.split(".")
            for depth in range(1, len(parts) + 1):
                parent = module_file(".".join(parts[:depth]))
                if parent is not None:
                    edges[path].add(parent)
            target = module_file(item.module)
            if target is None:
                if not item.optional and item.module not in may_be_absent:
                    problems.append(f"{path}:{item.line}: imports {item.module}, which the project does not have")
                continue
            for name in item.names:
                submodule = module_file(f"{item.module}.{name}")
                if submodule is not None:
                    edges[path].add(submodule)
                    continue
                target_info = details[target]
                if name != "*" and name not in target_info.bound and not target_info.open_namespace and not item.optional:
                    problems.append(f"{path}:{item.line}: imports {name} from {item.module}, which does not define it")

    for command_module in sorted(python_m_modules(project)):
        if command_module.split(".")[0] in roots and command_module not in modules:
            problems.append(f"a command runs `python -m {command_module}`, which the project does not have")

    reached: set[str] = set()
    pending = list(entry_points(project))
    while pending:
        path = pending.pop()
        if path in reached:
            continue
        reached.add(path)
        pending.extend(edges.get(path, ()))
        # Loading a module runs the __init__.py of each package it is in.
        package = PurePosixPath(path).parent
        while str(package) != ".":
            init = f"{package}/__init__.py"
            if init in details:
                pending.append(init)
            package = package.parent
    for path in sorted(set(details) - reached):
        problems.append(f"{path}: nothing imports or runs it (left over from a feature that is off?)")
    return problems


def third_party_imports(project) -> dict[str, list[str]]:
    """Top-level names of the packages the project imports when a module loads.

    Not the project's own, not the standard library's, not inside try/except
    ImportError, and not inside a function: code such as `from prometheus_client
    import Gauge` in a function that runs only when metrics are on is the
    suite's to exercise, not a requirement of every render.
    """
    roots = first_party_roots(project)
    found: dict[str, list[str]] = {}
    for path, info in infos(project).items():
        for item in info.imports:
            top = item.module.split(".")[0]
            if not top or item.optional or not item.at_load or top in roots or top in sys.stdlib_module_names:
                continue
            found.setdefault(top, []).append(f"{path}:{item.line}")
    return found


# --- settings the code reads ------------------------------------------------------------


def settings_read(project) -> set[str]:
    """Every ALL_CAPS string literal in the project's non-test Python: the settings its code reads."""
    names: set[str] = set()
    for path, source in python_files(project).items():
        if not path.startswith("tests/"):
            names.update(settings_in(source))
    return names


@cache
def settings_in(source: str) -> frozenset[str]:
    return frozenset(SETTING_NAME.findall(source))


@cache
def _load_yaml(text: str):
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def load_yaml(text: str):
    """A YAML document, parsed once per distinct text (callers must not change it)."""
    return _load_yaml(text)


# --- docker-compose.yml -----------------------------------------------------------------


def hosts_named(name: str, value) -> set[str]:
    """Host names a setting points at: the host of a URL, or the value of a *_HOST setting."""
    if not isinstance(value, str):
        return set()
    if "://" in value:
        try:
            host = urlsplit(value).hostname
        except ValueError:
            return set()
        return {host} if host else set()
    if name.endswith("_HOST") and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", value):
        return {value}
    return set()


def has_healthcheck(project, service: dict) -> bool:
    """A compose healthcheck, or (for a service built here) the Dockerfile's HEALTHCHECK."""
    if "healthcheck" in service:
        return not service["healthcheck"].get("disable", False)
    dockerfile = project.get("Dockerfile") if "build" in service else None
    return bool(dockerfile and re.search(r"^HEALTHCHECK\s+(?!NONE)", dockerfile, re.MULTILINE))


def compose_problems(project) -> list[str]:
    """Every host a compose environment names is a healthy, awaited service; every service is used."""
    if "docker-compose.yml" not in project.files:
        return ["docker-compose.yml is missing"]
    document = load_yaml(project.text("docker-compose.yml"))
    services = document.get("services") or {}
    problems = []
    own = {name for name, service in services.items() if "build" in service}
    backing = set(services) - own
    used: set[str] = set()
    read = settings_read(project)
    if not own:
        problems.append("docker-compose.yml builds no service from this project")
    if "Dockerfile" not in project.files and own:
        problems.append("docker-compose.yml builds from . but there is no Dockerfile")

    for name, service in services.items():
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment)
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {item: {"condition": "service_started"} for item in depends}
        for dependency, condition in depends.items():
            if dependency not in services:
                problems.append(f"{name}: depends on {dependency}, which is not a compose service")
            elif condition.get("condition") == "service_healthy" and not has_healthcheck(project, services[dependency]):
                problems.append(f"{name}: waits for {dependency} to be healthy, but it has no healthcheck")
        image = service.get("image", "") if "build" not in service else ""
        if image and (not re.search(r":[\w.-]+$", image) or image.endswith(":latest")):
            problems.append(f"{name}: image {service['image']} is not pinned to a version")
        if name in own:
            for setting, value in environment.items():
                if setting not in read and not LIBRARY_SETTINGS.match(setting):
                    problems.append(f"{name}: sets {setting}, which the service's code never reads")
                for host in hosts_named(setting, value):
                    used.add(host)
                    if host not in services:
                        problems.append(f"{name}: {setting}={value} points at {host}, which is not a compose service")
                        continue
                    if not has_healthcheck(project, services[host]):
                        problems.append(f"{name}: {setting} points at {host}, which has no healthcheck")
                    if depends.get(host, {}).get("condition") != "service_healthy":
                        problems.append(f"{name}: uses {host} ({setting}) without waiting for it to be healthy")
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith("./"):
                relative = source[2:]
                if relative not in project.files and relative not in project.folders:
                    problems.append(f"{name}: mounts {source}, which the project does not have")
                elif relative in project.files:
                    text = project.text(relative)
                    # A service configured to reach ours (prometheus scraping it) is in use.
                    if any(re.search(rf"\b{re.escape(target)}\b", text) for target in own):
                        used.add(name)
    for name in sorted(backing - used):
        problems.append(f"{name}: no service of the project uses it (no setting points at it)")
    return problems


# --- the initial migration --------------------------------------------------------------


def migration_problems(project) -> list[str]:
    """The migrations create exactly the tables the models declare."""
    details = infos(project)
    declared = {
        table
        for path, info in details.items()
        if not path.startswith(("tests/", "migrations/"))
        for table in info.tablenames
    }
    created = {
        table for path, info in details.items() if path.startswith("migrations/versions/") for table in info.created_tables
    }
    problems = []
    if not any(path.startswith("migrations/versions/") for path in details):
        problems.append("migrations/versions has no migration")
    for table in sorted(declared - created):
        problems.append(f"a model declares table {table!r}, which no migration creates")
    for table in sorted(created - declared):
        problems.append(f"a migration creates table {table!r}, which no model declares")
    return problems


# --- requirements -----------------------------------------------------------------------


def requirements_problems(project) -> list[str]:
    """Included requirement files exist; the database driver matches the database compose uses."""
    problems = []
    for path, data in project.files.items():
        if not is_requirements_file(path):
            continue
        for line in requirement_lines(data):
            if line.startswith("-r "):
                included = str(PurePosixPath(path).parent / line[3:].strip()).removeprefix("./")
                if included not in project.files:
                    problems.append(f"{path}: includes {included}, which does not exist")
    return problems


# --- the generated project's CI workflow --------------------------------------------------


def workflow_problems(project) -> list[str]:
    """The project's CI makes service tests fail instead of skip, and gives them every URL they read."""
    path = ".github/workflows/ci.yml"
    if path not in project.files:
        return [f"{path} is missing"]
    workflow = load_yaml(project.text(path))
    read_by_tests = {
        name
        for file, source in python_files(project).items()
        if file.startswith("tests/")
        for name in re.findall(r"[\"'](TEST_[A-Z_]+)[\"']", source)
    }
    problems = []
    test_jobs = [
        (name, job)
        for name, job in workflow.get("jobs", {}).items()
        if any(re.search(r"\bpytest\b|make test", str(step.get("run", ""))) for step in job.get("steps", []))
    ]
    if not test_jobs:
        return [f"{path}: no job runs the tests"]
    for name, job in test_jobs:
        env = {key: str(value) for key, value in (job.get("env") or {}).items()}
        if env.get("TEST_REQUIRE_SERVICES", "").lower() not in {"1", "true", "yes"}:
            problems.append(f"{path}: job {name} does not set TEST_REQUIRE_SERVICES, so service tests may skip")
        published = {
            int(port.split(":")[0]): service
            for service, definition in (job.get("services") or {}).items()
            for port in definition.get("ports", [])
        }
        used_services = set()
        for variable in sorted(read_by_tests - {"TEST_REQUIRE_SERVICES", "TEST_DATABASE_URL"}):
            if variable.endswith("_URL") and variable not in env:
                problems.append(f"{path}: job {name} does not set {variable}, which the tests read")
        for variable, value in env.items():
            if not variable.endswith("_URL"):
                continue
            if variable not in read_by_tests:
                problems.append(f"{path}: job {name} sets {variable}, which no test reads")
            parts = urlsplit(value)
            if parts.hostname in {"127.0.0.1", "localhost"}:
                service = published.get(parts.port)
                if service is None:
                    problems.append(f"{path}: {variable} points at port {parts.port}, which no service container publishes")
                used_services.add(service)
        for service in sorted(set(published.values()) - used_services):
            problems.append(f"{path}: job {name} starts {service}, which no test URL points at")
        compose = load_yaml(project.get("docker-compose.yml") or "{}") or {}
        database_urls = {
            str(value)
            for service in (compose.get("services") or {}).values()
            for key, value in (service.get("environment") or {}).items()
            if key == "DATABASE_URL"
        }
        schemes = {url.split("://")[0] for url in database_urls}
        server_database = bool(schemes) and not all(scheme.startswith("sqlite") for scheme in schemes)
        if server_database and "TEST_DATABASE_URL" not in env:
            problems.append(f"{path}: job {name} tests on SQLite, but the service runs on {sorted(schemes)}")
        if "TEST_DATABASE_URL" in env and env["TEST_DATABASE_URL"].split("://")[0] not in schemes:
            problems.append(f"{path}: TEST_DATABASE_URL is not the database the service uses ({sorted(schemes)})")
    return problems


#: Every whole-project check, by name.
PROJECT_CHECKS = {
    "imports": import_problems,
    "compose": compose_problems,
    "migration": migration_problems,
    "requirements": requirements_problems,
    "workflow": workflow_problems,
}
