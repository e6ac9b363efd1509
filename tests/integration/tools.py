"""Running the signgate console script and the real cosign CLI from tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SIGNGATE = Path(sys.executable).with_name("signgate")
REPO_ROOT = Path(__file__).resolve().parents[2]
TOOLS = Path(os.environ.get("SIGNGATE_TOOLS", REPO_ROOT / ".tools" / "bin"))


def tool_path(name: str) -> Path:
    """A real CLI from $SIGNGATE_TOOLS (cosign2, cosign3, oras); the test fails if it is missing."""
    import pytest

    binary = TOOLS / name
    if not os.access(binary, os.X_OK):
        pytest.fail(f"{name} not found in {TOOLS}; run scripts/setup.sh")
    return binary


def tool_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment: no inherited registry/cosign settings, HOME in the test's tmp."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("COSIGN_", "SIGSTORE_", "DOCKER_", "TUF_"))
    }
    env.update(HOME=str(home), DOCKER_CONFIG=str(home / ".docker"), **extra)
    return env


def run(
    argv: list[str], env: dict[str, str], cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        )
    return result


def signgate(*args: str, env: dict[str, str], cwd: Path | None = None, check: bool = True
             ) -> subprocess.CompletedProcess[str]:
    return run([str(SIGNGATE), *args], env, cwd, check)
