"""Static checks of the Dockerfile (no Docker engine here): pinned base, real COPY sources, CI's pins, CLI entry.

These keep the image buildable in principle; they do not build it. The build itself runs a smoke check
(CLI, worker imports, offline backbone weights).
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib

from .conftest import REPO

DOCKERFILE = REPO / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _pip_install(text: str) -> tuple[str, set[str]]:
    """The constraints file and the extras of the first ``pip install ... -c FILE ".[extras]"`` in ``text``."""
    match = re.search(r"pip install[^\n&]*?-c\s+(\S+)[^\n&]*?\"?\.\[([\w,\-]+)\]\"?", text)
    assert match, f"no `pip install -c FILE .[extras]` in {text[:200]!r}"
    return match.group(1), set(match.group(2).split(","))


def test_base_image_is_pinned_to_a_version() -> None:
    froms = [args for word, args in _instructions() if word == "FROM"]
    assert len(froms) == 1
    image = froms[0].split()[0]
    assert "@sha256:" in image or re.fullmatch(r"[\w./-]+:\d+\.\d+(\.\d+)?[\w.-]*", image), image
    python = re.match(r"python:(\d+)\.(\d+)", image)
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python and requires == ">=3.11" and (int(python[1]), int(python[2])) >= (3, 11)


def test_copy_sources_exist_and_cover_the_package() -> None:
    copied: set[str] = set()
    for word, args in _instructions():
        if word == "COPY" and not args.startswith("--from"):
            sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
            for source in sources:
                assert (REPO / source).exists(), f"COPY source {source} does not exist"
                copied.add(source.rstrip("/"))
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_dirs = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    needed = {"pyproject.toml", "constraints.txt", pyproject["project"]["readme"]}
    assert needed | {d.split("/")[0] for d in package_dirs} <= copied


def test_pip_install_uses_the_makefile_pins_and_extras() -> None:
    runs = " && ".join(args for word, args in _instructions() if word == "RUN")
    docker_constraints, docker_extras = _pip_install(runs)
    make_constraints, make_extras = _pip_install((REPO / "Makefile").read_text())
    assert docker_constraints == make_constraints == "constraints.txt"
    assert "gpu" in docker_extras and docker_extras <= make_extras  # the image: CI's install minus dev tools
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert docker_extras <= set(extras)


def test_entrypoint_is_the_cli() -> None:
    entry = [args for word, args in _instructions() if word == "ENTRYPOINT"]
    assert len(entry) == 1 and json.loads(entry[0]) == ["jungletrap"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["jungletrap"] == "jungletrap.cli:app"
