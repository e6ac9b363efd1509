"""The Containerfile, read as a builder reads it: no engine can build it here, so the test checks
that what it runs and copies matches the package (its entrypoint is the installed ``signgate
serve``, its COPY sources exist, its extras are runtime extras) and that it runs as non-root."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.tools import REPO_ROOT, SIGNGATE

pytestmark = pytest.mark.integration

CONTAINERFILE = REPO_ROOT / "Containerfile"
CHART_VALUES = REPO_ROOT / "charts" / "signgate" / "values.yaml"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str

    def words(self) -> list[str]:
        return shlex.split(self.arguments)


@dataclass(frozen=True)
class Stage:
    base: str
    name: str | None
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def args(self) -> dict[str, str]:
        """The stage's ARG defaults."""
        defaults = {}
        for instruction in self.all("ARG"):
            name, _, default = instruction.arguments.partition("=")
            defaults[name] = default
        return defaults


def instructions(path: Path = CONTAINERFILE) -> list[Instruction]:
    """The file's instructions: comment lines dropped, continuation lines joined, as the
    Dockerfile frontend reads them."""
    result: list[Instruction] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.strip():
            keyword, _, arguments = line.strip().partition(" ")
            result.append(Instruction(keyword.upper(), " ".join(arguments.split())))
    assert not pending, "the Containerfile ends inside a continued line"
    return result


def stages(path: Path = CONTAINERFILE) -> tuple[dict[str, str], list[Stage]]:
    """The global ARG defaults (before the first FROM) and the stages, bases substituted."""
    global_args: dict[str, str] = {}
    found: list[tuple[str, str | None, list[Instruction]]] = []
    for instruction in instructions(path):
        if instruction.keyword == "FROM":
            words = instruction.words()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)",
                          lambda m: global_args[m[1] or m[2]], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            found.append((base, name, []))
        elif not found:
            assert instruction.keyword == "ARG", f"{instruction} before the first FROM"
            name, _, default = instruction.arguments.partition("=")
            global_args[name] = default
        else:
            found[-1][2].append(instruction)
    return global_args, [Stage(base, name, tuple(body)) for base, name, body in found]


def final_stage() -> Stage:
    return stages()[1][-1]


def entrypoint() -> list[str]:
    """The final stage's ENTRYPOINT, in exec form."""
    (instruction,) = final_stage().all("ENTRYPOINT")
    argv: list[str] = json.loads(instruction.arguments)
    return argv


def final_environment() -> dict[str, str]:
    environment: dict[str, str] = {}
    for instruction in final_stage().all("ENV"):
        for word in instruction.words():
            name, _, value = word.partition("=")
            environment[name] = value
    return environment


def pyproject() -> dict[str, Any]:
    with (REPO_ROOT / "pyproject.toml").open("rb") as stream:
        return tomllib.load(stream)


def test_multi_stage_on_slim_python_311() -> None:
    _, found = stages()
    assert len(found) >= 2
    for stage in found:
        assert re.fullmatch(r"docker\.io/library/python:3\.11-slim(-\w+)?", stage.base), stage
    build, final = found[0], found[-1]
    assert build.name is not None
    assert final.name is None
    assert final.base == build.base  # the venv's interpreter is at the same path in both
    copies_from_build = [c for c in final.all("COPY") if c.words()[0] == f"--from={build.name}"]
    assert [c.words()[1:] for c in copies_from_build] == [["/opt/signgate", "/opt/signgate"]]
    # Only the venv: no sources, and the build stage's tools stay behind...
    assert len(final.all("COPY")) == len(copies_from_build)
    # ...and the final stage removes the base image's.
    (uninstall,) = final.all("RUN")
    assert re.search(r"pip uninstall --yes .*\bpip setuptools wheel$", uninstall.arguments)


def test_entrypoint_is_the_installed_signgate_serve() -> None:
    command, *arguments = entrypoint()
    assert (command, arguments) == ("signgate", ["serve"])
    # The console script the package installs under that name...
    assert pyproject()["project"]["scripts"] == {command: "signgate.cli.main:main"}
    # ...on the final stage's PATH, where the build stage installs it...
    path = final_environment()["PATH"].split(":")
    assert path[0] == "/opt/signgate/bin"
    (install,) = stages()[1][0].all("RUN")
    assert "python -m venv --without-pip /opt/signgate " in install.arguments
    assert "--python /opt/signgate/bin/python install" in install.arguments
    # ...has the serve command (the same script, installed here in the venv).
    assert SIGNGATE.name == command
    result = subprocess.run([str(SIGNGATE), *arguments, "--help"], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "--policy FILE" in result.stdout
    assert "--tls-cert FILE" in result.stdout


def test_copy_sources_exist_and_hold_what_the_build_reads() -> None:
    build = stages()[1][0]
    copied: list[str] = []
    for copy in build.all("COPY"):
        *sources, _destination = copy.words()
        assert not any(s.startswith("--") for s in sources), copy
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the build context"
        copied += sources
    project = pyproject()
    assert project["project"]["readme"] in copied
    assert "pyproject.toml" in copied
    for where in project["tool"]["setuptools"]["packages"]["find"]["where"]:
        assert where in copied
    (workdir,) = build.all("WORKDIR")
    (install,) = build.all("RUN")
    assert f'"{workdir.arguments}[${{SIGNGATE_EXTRAS}}]"' in install.arguments


def test_only_runtime_extras_from_wheels() -> None:
    build = stages()[1][0]
    extras = build.args()["SIGNGATE_EXTRAS"].split(",")
    optional = pyproject()["project"]["optional-dependencies"]
    assert set(extras) <= set(optional)
    assert "dev" not in extras
    assert "kms" not in extras  # it would bring pkcs11, which no webhook pod can use
    assert set(extras) == set(optional) - {"dev", "kms", "pkcs11"}
    (install,) = build.all("RUN")
    assert "--only-binary=:all:" in install.words()
    assert not re.search(r"apt-get|apk |gcc|build-essential", install.arguments)
    # uvloop and httptools are plain runtime dependencies; they come as wheels.
    dependencies = " ".join(pyproject()["project"]["dependencies"])
    assert "uvloop" in dependencies
    assert "httptools" in dependencies


def test_runs_as_the_non_root_user_the_chart_expects() -> None:
    (user,) = final_stage().all("USER")
    uid, _, gid = user.arguments.partition(":")
    # Numeric: the kubelet can check runAsNonRoot only against a numeric user.
    assert uid.isdigit()
    assert gid.isdigit()
    assert int(uid) != 0
    assert int(gid) != 0
    values = yaml.safe_load(CHART_VALUES.read_text())
    assert values["podSecurityContext"]["runAsUser"] == int(uid)
    assert values["podSecurityContext"]["runAsGroup"] == int(gid)
    assert values["podSecurityContext"]["runAsNonRoot"] is True


def test_read_only_root_filesystem_ready() -> None:
    environment = final_environment()
    assert environment["PYTHONDONTWRITEBYTECODE"] == "1"
    assert environment["HOME"] == "/tmp"  # the chart's tmpfs
    (expose,) = final_stage().all("EXPOSE")
    values = yaml.safe_load(CHART_VALUES.read_text())
    assert int(expose.arguments) == values["server"]["port"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("FROM a AS b\nRUN x \\\n", "ends inside a continued line"),
        ("RUN x\nFROM a\n", "before the first FROM"),
    ],
)
def test_the_reader_refuses_what_a_builder_refuses(tmp_path: Path, text: str,
                                                   problem: str) -> None:
    path = tmp_path / "Containerfile"
    path.write_text(text)
    with pytest.raises(AssertionError, match=problem):
        stages(path)
