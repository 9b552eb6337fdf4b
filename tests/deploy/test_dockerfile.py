"""deploy/Dockerfile without a container engine: what it copies is enough to build kvtier.

The build stage copies a few paths of the repository and runs ``pip install .[EXTRAS]``. Here
the same paths (read from the Dockerfile) go into an empty directory and pip builds the wheel
from it: the three import packages, the proto sources and the ``kvtier`` entry point must be in
it. Installing the dependencies (the torch wheel, CUDA for the GPU variant) is not tested.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def copied_paths() -> list[str]:
    text = DOCKERFILE.read_text()
    paths: list[str] = []
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        parts = line.split()
        paths += parts[:-1]  # the last word is the destination
    return paths


def test_copied_paths_exist_and_are_not_docker_ignored() -> None:
    paths = copied_paths()
    assert {"pyproject.toml", "services", "client", "proto"} <= set(paths)
    ignored = {line.strip() for line in
               (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for p in paths:
        assert (ROOT / p).exists(), p
        assert p not in ignored, f"{p} is copied but excluded by Dockerfile.dockerignore"


def test_the_build_context_builds_the_package(tmp_path: Path) -> None:
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for p in copied_paths():
        src = ROOT / p
        if src.is_dir():
            shutil.copytree(src, ctx / p,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            shutil.copy2(src, ctx / p)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), str(ctx)],
        capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("kvtier-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("kvtier/daemon.py", "kvtier/admin/app.py", "kvtier/cli/serve.py",
                   "kvtier_client/__init__.py", "kvtier_proto/v1/cache_pb2.py",
                   "kvtier_proto/v1/cache.proto"):
        assert needed in names, needed
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "kvtier = kvtier.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
