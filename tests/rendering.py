"""Render the template in this process, as cookiecutter does, many times over.

`cookiecutter()` compiles every Jinja template again for each project and runs
each hook in a new Python process: about 0.3 s of CPU per combination, most of
it spent on work that is the same for every combination. `Renderer` keeps
cookiecutter's own steps (its context functions, its Jinja environment, its
file walk, binary and newline rules, file modes) but compiles each template
once, and runs the real hooks' `main()` in this process. Its output is compared
byte for byte, mode for mode, with real `cookiecutter` runs by
tests/test_rendering.py::test_in_process_render_is_faithful.

A rendered project is kept in memory (`Project`): relative path -> bytes, plus
file modes and folders, so the checks can read it without touching the disk.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import fnmatch
import importlib.util
import io
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

from binaryornot.check import is_binary
from cookiecutter.environment import StrictEnvironment
from cookiecutter.generate import generate_context
from cookiecutter.main import cookiecutter
from cookiecutter.prompt import prompt_for_config
from jinja2 import FileSystemLoader

from tests.combinations import TEMPLATE

#: Renders go to memory where the system offers it (removing thousands of small
#: folders from a disk costs more than rendering them).
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


@dataclass
class Project:
    """One rendered project: its answers, cookiecutter's context and its files."""

    answers: dict
    context: dict
    name: str
    files: dict[str, bytes] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)
    folders: set[str] = field(default_factory=set)

    def text(self, relative: str) -> str:
        return self.files[relative].decode("utf-8")

    def get(self, relative: str) -> str | None:
        data = self.files.get(relative)
        return None if data is None else data.decode("utf-8")

    def write(self, root: Path) -> Path:
        """Write the project under root (for tools that need files); returns its folder."""
        project = root / self.name
        for folder in sorted(self.folders):
            (project / folder).mkdir(parents=True, exist_ok=True)
        for relative, data in self.files.items():
            path = project / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            path.chmod(self.modes[relative])
        return project


def read_tree(project: Path, answers: dict, context: dict) -> Project:
    """A project folder on disk as a `Project`."""
    result = Project(answers=answers, context=context, name=project.name)
    for path in sorted(project.rglob("*")):
        relative = path.relative_to(project).as_posix()
        if path.is_dir():
            result.folders.add(relative)
        else:
            result.files[relative] = path.read_bytes()
            result.modes[relative] = stat.S_IMODE(path.stat().st_mode)
    return result


class Hook:
    """A hook script run in this process, its Jinja tags rendered as cookiecutter renders them.

    cookiecutter renders a hook's whole source with Jinja, then runs it. Our
    hooks are valid Python before rendering and keep their tags inside
    module-level string constants (tests/test_template_lint.py holds them to
    that), so the module is imported once and, per project, only those
    constants are rendered and set. A tag anywhere else cannot be run this
    way and stops the renderer.
    """

    def __init__(self, path: Path, module=None):
        self.source = path.read_text(encoding="utf-8")
        if module is None:
            spec = importlib.util.spec_from_file_location(f"in_process_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses look their module up here
            spec.loader.exec_module(module)
        self.module = module
        self.constants: dict[str, str] = {}
        tagged = {number for number, line in enumerate(self.source.splitlines(), 1) if TAG.search(line)}
        for node in ast.parse(self.source).body:
            if (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
                and TAG.search(node.value.value)
            ):
                self.constants[node.targets[0].id] = ast.get_source_segment(self.source, node.value)
                tagged -= set(range(node.lineno, node.end_lineno + 1))
        if tagged:
            raise RuntimeError(f"{path}: Jinja tags outside module-level string constants, lines {sorted(tagged)}")

    def run(self, env, context: dict) -> tuple[int, str, str]:
        """main() with the constants rendered for this context: (exit code, stdout, stderr)."""
        for name, literal in self.constants.items():
            setattr(self.module, name, ast.literal_eval(env.from_string(literal).render(**context)))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = self.module.main()
        return code, out.getvalue(), err.getvalue()


TAG = re.compile(r"\{\{|\{%|\{#")


def load_hook(name: str, template: Path = TEMPLATE):
    """A hook script as a module (both hooks are valid Python before Jinja renders them)."""
    return Hook(template / "hooks" / f"{name}.py").module


class CachingEnvironment(StrictEnvironment):
    """cookiecutter's StrictEnvironment that compiles each template string once."""

    def from_string(self, source, globals=None, template_class=None):  # noqa: A002 (Jinja's name)
        if globals is not None or template_class is not None:
            return super().from_string(source, globals, template_class)
        cache = self.__dict__.setdefault("_compiled_strings", {})
        if source not in cache:
            cache[source] = super().from_string(source)
        return cache[source]


class Refused(Exception):
    """The pre-generation hook refused the answers; the message is what it printed."""


class Renderer:
    """cookiecutter's generation, with each template compiled once per process."""

    def __init__(self, template: Path = TEMPLATE, post_gen=None):
        self.template = Path(template)
        self.post_gen = Hook(self.template / "hooks" / "post_gen_project.py", post_gen)
        self.pre_gen = Hook(self.template / "hooks" / "pre_gen_project.py")
        # The pre-generation hook imports the feature table from the template
        # folder; here it gets the one this renderer uses (the same file).
        self.pre_gen.module.load_feature_table = lambda *args, **kwargs: self.post_gen.module
        self.environments: dict[str, StrictEnvironment] = {}
        self.binary: dict[str, bool] = {}
        self.newlines: dict[str, str | None] = {}

    @contextlib.contextmanager
    def import_patch(self):
        """cookiecutter puts the template on sys.path while it renders (local_extensions)."""
        saved = list(sys.path)
        sys.path.append(str(self.template))
        try:
            yield
        finally:
            sys.path[:] = saved

    def environment(self, context: dict) -> StrictEnvironment:
        settings = context["cookiecutter"]
        key = json.dumps([settings.get("_extensions", []), settings.get("_jinja2_env_vars", {})], sort_keys=True)
        if key not in self.environments:
            with self.import_patch():
                env = CachingEnvironment(context=context, keep_trailing_newline=True, **settings.get("_jinja2_env_vars", {}))
            env.loader = FileSystemLoader([".", "../templates"])
            self.environments[key] = env
        return self.environments[key]

    def context(self, answers: dict, output_dir: str) -> dict:
        """The context `cookiecutter(template, no_input=True, extra_context=answers)` builds."""
        context = generate_context(
            context_file=str(self.template / "cookiecutter.json"),
            default_context={},
            extra_context=copy.deepcopy(answers),
        )
        context["_cookiecutter"] = {k: v for k, v in context["cookiecutter"].items() if not k.startswith("_")}
        with self.import_patch(), mock.patch("cookiecutter.prompt.create_env_with_context", self.environment):
            context["cookiecutter"].update(prompt_for_config(context, no_input=True))
        context["cookiecutter"]["_template"] = str(self.template)
        context["cookiecutter"]["_output_dir"] = os.path.abspath(output_dir)
        context["cookiecutter"]["_repo_dir"] = str(self.template)
        context["cookiecutter"]["_checkout"] = None
        return context

    @staticmethod
    def render_name(env, name: str, context: dict) -> str:
        return env.from_string(name).render(**context)

    def check_answers(self, context: dict) -> None:
        """Run the pre-generation hook's checks; raise Refused with its message."""
        env = self.environment(context)
        with self.import_patch():
            code, _, err = self.pre_gen.run(env, context)
        if code != 0:
            raise Refused(err.strip())

    def generate(self, context: dict, output_dir: Path) -> Path:
        """cookiecutter.generate.generate_files, hooks run in this process."""
        env = self.environment(context)
        (template_dir,) = [p for p in self.template.iterdir() if "cookiecutter" in p.name and "{{" in p.name]
        project_dir = Path(output_dir, self.render_name(env, template_dir.name, context)).resolve()
        project_dir.mkdir(parents=True)
        self.check_answers(context)
        here = os.getcwd()
        os.chdir(template_dir)
        try:
            with self.import_patch():
                self.write_files(env, context, project_dir)
        finally:
            os.chdir(here)
        os.chdir(project_dir)
        try:
            with self.import_patch():
                code, _, _ = self.post_gen.run(env, context)
        finally:
            os.chdir(here)
        assert code == 0, f"the post-generation hook returned {code}"
        return project_dir

    def write_files(self, env, context: dict, project_dir: Path) -> None:
        def copy_only(path: str) -> bool:
            return any(fnmatch.fnmatch(path, p) for p in context["cookiecutter"].get("_copy_without_render", []))

        for root, dirs, files in os.walk("."):
            copy_dirs = [d for d in dirs if copy_only(os.path.normpath(os.path.join(root, d)))]
            for copy_dir in copy_dirs:
                indir = os.path.normpath(os.path.join(root, copy_dir))
                outdir = self.render_name(env, os.path.normpath(os.path.join(str(project_dir), indir)), context)
                shutil.copytree(indir, outdir)
            dirs[:] = [d for d in dirs if d not in copy_dirs]
            for d in dirs:
                relative = self.render_name(env, os.path.normpath(os.path.join(root, d)), context)
                (project_dir / relative).mkdir(parents=True, exist_ok=True)
            for name in sorted(files):
                infile = os.path.normpath(os.path.join(root, name))
                outfile = project_dir / self.render_name(env, infile, context)
                if outfile.is_dir():
                    continue
                if infile not in self.binary:
                    self.binary[infile] = is_binary(infile)
                if copy_only(infile) or self.binary[infile]:
                    shutil.copyfile(infile, outfile)
                else:
                    rendered = env.get_template(infile.replace(os.path.sep, "/")).render(**context)
                    if infile not in self.newlines:
                        self.newlines[infile] = self.newline(infile)
                    newline = context["cookiecutter"].get("_new_lines") or self.newlines[infile]
                    with open(outfile, "w", encoding="utf-8", newline=newline) as handle:
                        handle.write(rendered)
                shutil.copymode(infile, outfile)

    @staticmethod
    def newline(infile: str):
        with open(infile, encoding="utf-8") as handle:
            handle.readline()
        return handle.newlines[0] if isinstance(handle.newlines, tuple) else handle.newlines

    def render(self, answers: dict) -> Project:
        """Render one combination into memory; raises Refused when the answers are refused."""
        with tempfile.TemporaryDirectory(prefix="render-", dir=SCRATCH) as tmp:
            context = self.context(answers, tmp)
            project_dir = self.generate(context, Path(tmp))
            return read_tree(project_dir, answers, dict(context["cookiecutter"]))


def render_with_cookiecutter(answers: dict, template: Path = TEMPLATE) -> Project:
    """What a user gets: the real `cookiecutter()` with its hook subprocesses."""
    with tempfile.TemporaryDirectory(prefix="cookiecutter-", dir=SCRATCH) as tmp:
        config = {"replay_dir": f"{tmp}/replay", "cookiecutters_dir": f"{tmp}/cache"}
        out = Path(tmp, "out")
        out.mkdir()
        with contextlib.redirect_stdout(io.StringIO()):
            project = Path(
                cookiecutter(str(template), no_input=True, extra_context=answers, output_dir=str(out), default_config=config)
            )
        replay = json.loads(Path(tmp, "replay", f"{template.name}.json").read_text(encoding="utf-8"))
        context = OrderedDict(replay["cookiecutter"])
        context["_output_dir"] = os.path.abspath(out)
        return read_tree(project, answers, dict(context))
