"""The container image: Dockerfile and .dockerignore checks, and an install rehearsal.

No container engine runs in CI, so the Dockerfile is parsed and checked statically, and the
install the Dockerfile performs is rehearsed offline: build the wheel from the build context
that .dockerignore lets through, install it into a fresh virtualenv, run the console scripts.
That rehearsal (``-k image_install``) takes a few seconds; the rest is instant.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parent.parent
KNOWN_INSTRUCTIONS = frozenset({
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
})
BASE_IMAGE = "python:3.11-slim"
BUILD_TOOLS = ("gcc", "g++", "make", "build-essential", "clang", "cmake")


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: its keyword, arguments and first line number."""

    keyword: str
    args: str
    line: int

    def flags(self) -> dict[str, str]:
        """The leading ``--name=value`` options (``--mount`` may repeat: last one wins)."""
        result: dict[str, str] = {}
        for word in shlex.split(self.args):
            if not word.startswith("--"):
                break
            name, _, value = word[2:].partition("=")
            result[name] = value
        return result


@dataclass(frozen=True)
class Stage:
    """A build stage: its FROM image, optional name and instructions."""

    image: str
    name: str | None
    instructions: tuple[Instruction, ...]


def parse_dockerfile(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions: comments dropped, continuation lines joined."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comments may sit between continuation lines
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        joined = " ".join(part for part in pending if part)
        pending = []
        keyword, _, args = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    if pending:
        raise ValueError(f"line {start}: continuation runs past the end of the file")
    return instructions


def stages(instructions: list[Instruction]) -> list[Stage]:
    """Group instructions by FROM."""
    result: list[Stage] = []
    current: list[Instruction] = []
    image, name = "", None
    for instruction in instructions:
        if instruction.keyword == "FROM":
            if image:
                result.append(Stage(image, name, tuple(current)))
            words = instruction.args.split()
            image = words[0]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            current = []
        else:
            current.append(instruction)
    if image:
        result.append(Stage(image, name, tuple(current)))
    return result


def _referenced_stages(instruction: Instruction) -> Iterator[str]:
    flags = instruction.flags()
    if instruction.keyword == "COPY" and "from" in flags:
        yield flags["from"]
    if instruction.keyword == "RUN":
        for mount in re.findall(r"--mount=(\S+)", instruction.args):
            options = dict(part.partition("=")[::2] for part in mount.split(","))
            if "from" in options:
                yield options["from"]


def dockerfile_problems(text: str) -> list[str]:
    """Everything wrong with a Dockerfile by this project's rules; empty when it is fine."""
    try:
        instructions = parse_dockerfile(text)
    except ValueError as err:
        return [str(err)]
    problems = [f"line {i.line}: unknown instruction {i.keyword}"
                for i in instructions if i.keyword not in KNOWN_INSTRUCTIONS]
    if not instructions or instructions[0].keyword != "FROM":
        problems.append("the first instruction must be FROM")
    for instruction in instructions:
        if instruction.keyword == "ADD" and re.search(r"(https?|git)://|git@", instruction.args):
            problems.append(f"line {instruction.line}: ADD of a URL (download in a RUN, verified)")
    seen: list[str] = []
    for stage in stages(instructions):
        if stage.image != BASE_IMAGE and stage.image not in seen:
            problems.append(f"stage {stage.name or '(final)'}: base image {stage.image}, "
                            f"expected {BASE_IMAGE}")
        for instruction in stage.instructions:
            problems.extend(f"line {instruction.line}: stage {ref!r} is not defined before"
                            for ref in _referenced_stages(instruction) if ref not in seen)
        if stage.name:
            seen.append(stage.name)
    problems.extend(_final_stage_problems(stages(instructions)))
    return problems


def _final_stage_problems(all_stages: list[Stage]) -> list[str]:
    if not all_stages:
        return []
    final = all_stages[-1].instructions
    problems: list[str] = []
    users = [i.args for i in final if i.keyword == "USER"]
    if not users:
        problems.append("the final stage sets no USER")
    elif users[-1].split(":")[0] in ("0", "root"):
        problems.append("the final stage's USER is root")
    env = " ".join(i.args for i in final if i.keyword == "ENV")
    for setting in ("NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_DRIVER_CAPABILITIES=utility"):
        if setting not in env.split():
            problems.append(f"the final stage does not set ENV {setting}")
    for instruction in final:
        if instruction.keyword != "RUN":
            continue
        if "pip install" in instruction.args and "--no-cache-dir" not in instruction.args:
            problems.append(f"line {instruction.line}: pip install without --no-cache-dir")
        words = set(re.split(r"[\s;&|]+", instruction.args))
        if ({"apt-get", "apt"} & words) and any(tool in words for tool in BUILD_TOOLS):
            problems.append(f"line {instruction.line}: build tools installed in the final stage")
    return problems


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _dockerignore_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    index = 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            out += "(?:.*/)?"
            index += 3
        elif pattern.startswith("**", index):
            out += ".*"
            index += 2
        elif pattern[index] == "*":
            out += "[^/]*"
            index += 1
        elif pattern[index] == "?":
            out += "[^/]"
            index += 1
        else:
            out += re.escape(pattern[index])
            index += 1
    return re.compile(out)


def dockerignore_patterns() -> list[str]:
    """The patterns of the repository's .dockerignore."""
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def build_context(root: Path) -> list[str]:
    """Files under ``root`` that ``docker build`` would send, as relative POSIX paths."""
    patterns = dockerignore_patterns()
    files: list[str] = []
    for directory, subdirs, names in os.walk(root):
        base = Path(directory).relative_to(root)
        # Prune what is excluded and never re-included (Docker walks the same way); an
        # excluded directory is still entered when a later "!" pattern may reach inside it.
        subdirs[:] = sorted(d for d in subdirs if d not in (".git", ".venv") and (
            not dockerignore_excludes(patterns, (base / d).as_posix())
            or any(p.startswith("!" + (base / d).as_posix() + "/") for p in patterns)))
        for name in sorted(names):
            relative = (base / name).as_posix()
            if not dockerignore_excludes(patterns, relative):
                files.append(relative)
    return sorted(files)


def pyproject() -> dict[str, object]:
    """pyproject.toml, parsed."""
    with (REPO / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)


def _project() -> dict[str, object]:
    project = pyproject()["project"]
    assert isinstance(project, dict)
    return project


def _scripts() -> dict[str, str]:
    scripts = _project()["scripts"]
    assert isinstance(scripts, dict)
    return {str(k): str(v) for k, v in scripts.items()}


# --------------------------------------------------------------------------------------------
# Static checks.


def test_dockerfile_has_no_problems() -> None:
    assert dockerfile_problems((REPO / "Dockerfile").read_text()) == []


def test_dockerfile_is_multi_stage_and_installs_from_the_builder() -> None:
    all_stages = stages(parse_dockerfile((REPO / "Dockerfile").read_text()))
    assert [s.name for s in all_stages] == ["builder", None]
    builder, final = all_stages
    assert any(i.keyword == "RUN" and "pip wheel" in i.args for i in builder.instructions)
    installs = [i for i in final.instructions if i.keyword == "RUN" and "pip install" in i.args]
    assert len(installs) == 1
    assert "--no-index" in installs[0].args and "from=builder" in installs[0].args
    # Nothing of the source tree reaches the final stage.
    assert not [i for i in final.instructions if i.keyword in ("COPY", "ADD")]


def test_dockerfile_copies_every_package_and_labels_the_version() -> None:
    instructions = parse_dockerfile((REPO / "Dockerfile").read_text())
    copied = {i.args.split()[0] for i in instructions
              if i.keyword == "COPY" and "--from" not in i.args}
    find = pyproject()["tool"]["setuptools"]["packages"]["find"]  # type: ignore[index]
    packages = {pattern.rstrip("*") for pattern in find["include"]}
    assert copied == {"pyproject.toml", *packages}
    # docker build fails on a COPY whose source .dockerignore keeps out of the context.
    context = build_context(REPO)
    missing = sorted(source for source in copied
                     if not any(f == source or f.startswith(source + "/") for f in context))
    assert missing == [], f"COPY sources outside the build context (.dockerignore): {missing}"
    assert f'org.opencontainers.image.version="{_project()["version"]}"' in " ".join(
        i.args for i in instructions if i.keyword == "LABEL")
    cmd = [i.args for i in instructions if i.keyword == "CMD"]
    assert cmd == ['["nvidia-device-plugin"]'] and "nvidia-device-plugin" in _scripts()


@pytest.mark.parametrize(("text", "problem"), [
    ("RUN echo hi\nFROM python:3.11-slim\nUSER 1\n", "first instruction must be FROM"),
    ("FROM python:3.11-slim\nFETCH x\nUSER 1\n", "unknown instruction FETCH"),
    ("FROM python:3.11-slim\nADD https://example.com/x.tgz /x\nUSER 1\n", "ADD of a URL"),
    ("FROM python:3.11-slim\nCOPY --from=builder /w /w\nUSER 1\n", "'builder' is not defined"),
    ("FROM python:3.11-slim\nRUN --mount=type=bind,from=wheels,target=/w true\nUSER 1\n",
     "'wheels' is not defined"),
    ("FROM python:3.11-slim\nENV NVIDIA_VISIBLE_DEVICES=all\n", "sets no USER"),
    ("FROM python:3.11-slim\nUSER root\n", "USER is root"),
    ("FROM python:3.11-slim\nUSER 1\n", "NVIDIA_DRIVER_CAPABILITIES=utility"),
    ("FROM python:3.11-slim\nRUN pip install x\nUSER 1\n", "without --no-cache-dir"),
    ("FROM python:3.11-slim\nRUN apt-get update && apt-get install -y gcc\nUSER 1\n",
     "build tools"),
    ("FROM ubuntu:24.04\nUSER 1\n", "expected python:3.11-slim"),
    ("FROM python:3.11-slim\nRUN true \\\n", "continuation runs past the end"),
])
def test_dockerfile_checks_catch_mistakes(text: str, problem: str) -> None:
    problems = dockerfile_problems(text)
    assert any(problem in p for p in problems), problems


def test_parser_joins_continuations_and_skips_comments() -> None:
    text = "# c\nFROM python:3.11-slim AS b\nRUN a \\\n  # inner\n  && b\nENV X=1 \\\n    Y=2\n"
    assert parse_dockerfile(text) == [
        Instruction("FROM", "python:3.11-slim AS b", 2),
        Instruction("RUN", "a && b", 3),
        Instruction("ENV", "X=1 Y=2", 6),
    ]


def test_dockerignore_semantics() -> None:
    patterns = ["*", "!gpus", "**/__pycache__", "!gpus/keep.pyc", "**/*.pyc"]
    assert dockerignore_excludes(patterns, "tests/test_x.py")
    assert not dockerignore_excludes(patterns, "gpus/model.py")
    assert dockerignore_excludes(patterns, "gpus/__pycache__/model.cpython-311.pyc")
    assert dockerignore_excludes(patterns, "gpus/keep.pyc")  # the later **/*.pyc wins


def test_build_context_holds_the_package_and_nothing_else() -> None:
    files = build_context(REPO)
    assert {"pyproject.toml", "README.md", "gpus/__init__.py", "deviceplugin/__init__.py",
            "gfd/__init__.py", "protos/deviceplugin/v1beta1/api.proto",
            "protos/deviceplugin/v1beta1/api_pb2.py"} <= set(files)
    tops = {f.split("/")[0] for f in files}
    find = pyproject()["tool"]["setuptools"]["packages"]["find"]  # type: ignore[index]
    packages = {pattern.rstrip("*") for pattern in find["include"]}
    assert packages >= {"gpus", "deviceplugin", "gfd", "protos"}
    assert tops == {"pyproject.toml", "README.md", *packages}
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]


def final_install_commands() -> dict[str, str]:
    """The final stage's install RUN split at ``&&``: its ``pip install`` and ``compileall``
    commands, as the shell would run them."""
    final = stages(parse_dockerfile((REPO / "Dockerfile").read_text()))[-1]
    (run,) = [i for i in final.instructions if i.keyword == "RUN" and "pip install" in i.args]
    commands = [c.strip() for c in run.args.split("&&")]
    commands[0] = commands[0].split(" ", 1)[1] if commands[0].startswith("--mount") else commands[0]
    found = {name: [c for c in commands if name in c] for name in ("pip install", "compileall")}
    assert all(len(matches) == 1 for matches in found.values()), found
    return {name: matches[0] for name, matches in found.items()}


def test_dockerfile_compiles_hash_based_bytecode_for_what_pip_installs() -> None:
    commands = final_install_commands()
    pip = shlex.split(commands["pip install"])
    compileall = shlex.split(commands["compileall"])
    # pip's own .pyc files are timestamp-based, and compileall would keep them (their mtimes
    # match), so pip must compile nothing.
    assert "--no-compile" in pip and pip[-1] == _project()["name"], pip
    assert compileall[:3] == ["python", "-m", "compileall"], compileall
    mode = compileall[compileall.index("--invalidation-mode") + 1]
    assert mode in ("checked-hash", "unchecked-hash"), mode


# --------------------------------------------------------------------------------------------
# Install rehearsal (-k image_install): what the two stages do, offline.


@dataclass(frozen=True)
class Installed:
    """A fresh virtualenv holding the wheel built from the Docker build context."""

    venv: Path
    wheel: Path
    workdir: Path
    build_log: str  # what `pip wheel` printed on stderr, the build backend's warnings included

    def bin(self, name: str) -> Path:
        """A console script or interpreter of the virtualenv."""
        return self.venv / "bin" / name


def _run(command: list[str | Path], cwd: Path, extra_env: dict[str, str] | None = None,
         stderr: bool = False) -> str:
    # cwd matters: `python -c` puts it first on sys.path, and the checkout must not be there.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(extra_env or {})
    done = subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stderr if stderr else done.stdout


@pytest.fixture(scope="module")
def image_install(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Builder stage: `pip wheel` of the context; final stage: `pip install` of that wheel with
    the Dockerfile's options, then the Dockerfile's own compileall command, run by the
    virtualenv's python.

    Offline: no build isolation (setuptools comes from the test's environment) and no
    dependency download; the fresh virtualenv sees the dependencies already installed for the
    tests through a .pth file, placed after its own site-packages, so the project itself is
    imported from the wheel and not from the editable checkout.
    """
    tmp = tmp_path_factory.mktemp("image")
    context = tmp / "context"
    for relative in build_context(REPO):
        target = context / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((REPO / relative).read_bytes())
    wheels = tmp / "wheels"
    build_log = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                      "--no-index", "--no-cache-dir", "--wheel-dir", wheels, context], cwd=tmp,
                     stderr=True)
    (wheel,) = wheels.glob("*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    commands = final_install_commands()
    options = [word for word in shlex.split(commands["pip install"])
               if word.startswith("--") and not word.startswith("--find-links")]
    _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install",
          *options, "--no-deps", f"--find-links={wheels}", str(_project()["name"])], cwd=tmp)
    _run(["bash", "-c", commands["compileall"]], cwd=tmp,
         extra_env={"PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"})
    site = _run([venv / "bin" / "python", "-c",
                 "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).strip()
    dependencies = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "zz_test_dependencies.pth").write_text("\n".join(sorted(dependencies)) + "\n")
    return Installed(venv, wheel, tmp, build_log)


def test_image_install_wheel_holds_data_files(image_install: Installed) -> None:
    names = set(zipfile.ZipFile(image_install.wheel).namelist())
    assert "protos/deviceplugin/v1beta1/api.proto" in names
    assert "protos/deviceplugin/v1beta1/api_pb2.py" in names
    profiles = {p.name for p in (REPO / "gpus" / "profiles").glob("*.yaml")}
    assert profiles and {f"gpus/profiles/{p}" for p in profiles} <= names


def test_image_install_build_prints_no_deprecation_warning(image_install: Installed) -> None:
    # setuptools warned on every install about the licence table (issue 10, defect 5).
    warnings = [line for line in image_install.build_log.splitlines()
                if re.search(r"deprecat|BuildBackendWarning|SetuptoolsWarning", line, re.I)]
    assert warnings == []


def test_image_install_wheel_declares_the_spdx_licence(image_install: Installed) -> None:
    with zipfile.ZipFile(image_install.wheel) as wheel:
        (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        headers = wheel.read(name).decode().split("\n\n", 1)[0].splitlines()
    assert "License-Expression: Apache-2.0" in headers
    assert not [h for h in headers if h.startswith("License:")]  # the deprecated field
    labels = " ".join(i.args for i in parse_dockerfile((REPO / "Dockerfile").read_text())
                      if i.keyword == "LABEL")
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in labels


def test_build_system_supports_the_spdx_licence_string() -> None:
    # PEP 639's `license = "<SPDX expression>"` needs setuptools 77; older ones refuse it.
    assert _project()["license"] == "Apache-2.0"
    requires = pyproject()["build-system"]["requires"]  # type: ignore[index]
    floors = [re.fullmatch(r"setuptools>=(\d+)(?:\.\d+)*", r) for r in requires]
    assert [int(m.group(1)) for m in floors if m] and all(
        int(m.group(1)) >= 77 for m in floors if m), requires


def test_image_install_imports_from_the_wheel(image_install: Installed) -> None:
    out = _run([image_install.bin("python"), "-c",
                "import gpus, deviceplugin, gfd, protos; print(gpus.__file__)"],
               cwd=image_install.workdir)
    assert Path(out.strip()).is_relative_to(image_install.venv)


@pytest.mark.parametrize("script", sorted(_scripts()))
def test_image_install_console_scripts(image_install: Installed, script: str) -> None:
    assert image_install.bin(script).is_file()
    module = _scripts()[script].split(":")[0]
    assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"{script}: no {module}"
    out = _run([image_install.bin(script), "--help"], cwd=image_install.workdir)
    assert "usage" in out.lower()


# --------------------------------------------------------------------------------------------
# Bytecode: a read-only image must not recompile anything at start, whatever the .py mtimes.

PACKAGES = ("gpus", "deviceplugin", "gfd", "protos", "exporter", "mpsdaemon", "demo")
# 1980-01-01, the earliest zip time: what a builder that normalises timestamps may leave.
NORMALISED_MTIME = 315532800
# The console scripts' modules import 29 of the project's modules today.
IMPORTED_AT_LEAST = 20


def _installed_sources(site: Path) -> list[Path]:
    return sorted(source for package in PACKAGES for source in (site / package).rglob("*.py"))


def _site(installed: Installed) -> Path:
    (site,) = (installed.venv / "lib").glob("python3*/site-packages")
    return site


def sources_compiled_at_import(python: Path, root: Path, workdir: Path,
                               extra_env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Import every console script's module as the image runs them (PYTHONDONTWRITEBYTECODE,
    nothing written) and return how many modules under ``root`` came from a .pyc, and the
    sources under ``root`` compiled instead (``python -v`` names both)."""
    modules = sorted({target.split(":")[0] for target in _scripts().values()})
    log = _run([python, "-v", "-c", f"import {', '.join(modules)}"], cwd=workdir, stderr=True,
               extra_env={"PYTHONDONTWRITEBYTECODE": "1", **(extra_env or {})})
    prefix = re.escape(str(root))
    from_pyc = re.findall(rf"^# ({prefix}/\S+\.pyc) matches ", log, re.M)
    compiled = re.findall(rf"^# code object from '?({prefix}/\S+\.py)'?$", log, re.M)
    return len(from_pyc), compiled


def _set_mtimes(sources: list[Path], mtime: int) -> None:
    for source in sources:
        os.utime(source, (mtime, mtime))


def test_image_install_bytecode_is_hash_based_for_every_module(image_install: Installed) -> None:
    sources = _installed_sources(_site(image_install))
    assert len(sources) > 30
    for source in sources:
        header = Path(importlib.util.cache_from_source(str(source))).read_bytes()[:16]
        flags = int.from_bytes(header[4:8], "little")
        # Bit 0: hash-based (PEP 552); bit 1: checked against the source at import.
        assert flags & 0b01, f"{source}: timestamp-based .pyc"
        assert header[8:16] == importlib.util.source_hash(source.read_bytes()), source


def test_image_install_uses_its_bytecode_whatever_the_source_mtimes(
        image_install: Installed) -> None:
    site = _site(image_install)
    _set_mtimes(_installed_sources(site), NORMALISED_MTIME)
    from_pyc, compiled = sources_compiled_at_import(image_install.bin("python"), site,
                                                    image_install.workdir)
    assert compiled == []
    assert from_pyc >= IMPORTED_AT_LEAST  # the check saw the project's modules being imported


def test_bytecode_check_notices_timestamp_based_pycs(image_install: Installed,
                                                     tmp_path: Path) -> None:
    # Guards the test above: the same packages with pip's (timestamp) .pyc files are all
    # recompiled once a builder has changed their mtimes.
    root = tmp_path / "timestamp"
    for package in PACKAGES:
        shutil.copytree(_site(image_install) / package, root / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    _set_mtimes(_installed_sources(root), NORMALISED_MTIME + 86400)  # when they were built
    _run([sys.executable, "-m", "compileall", "-q", "--invalidation-mode", "timestamp", root],
         cwd=tmp_path)
    _set_mtimes(_installed_sources(root), NORMALISED_MTIME)
    from_pyc, compiled = sources_compiled_at_import(
        image_install.bin("python"), root, image_install.workdir, {"PYTHONPATH": str(root)})
    assert from_pyc == 0 and len(compiled) >= IMPORTED_AT_LEAST, (from_pyc, compiled)
