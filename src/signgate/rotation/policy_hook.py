"""``--policy-hook``: the command that delivers the rewritten policy to the verifiers.

A rotation edits a policy file; the webhooks read theirs from a ConfigMap (or wherever the
platform keeps it). The hook runs after each edit (trust NEW, retire OLD) with ``/bin/sh -c``
and ``SIGNGATE_POLICY`` set to the file, for example
``kubectl create configmap signgate-policy --from-file=policy.yaml="$SIGNGATE_POLICY" -n signgate
--dry-run=client -o yaml | kubectl apply -f -``. Its output goes to stderr, since stdout carries
the rotation's report.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

from signgate.errors import PolicyError

STDERR = 2


async def run_policy_hook(command: str, policy: Path, step: str) -> None:
    """Run the hook after the ``step`` edit (``trust`` or ``retire``) of ``policy``; a
    :class:`PolicyError` when it cannot start or does not exit 0. It is told the step in
    ``SIGNGATE_ROTATION_STEP``."""
    env = {**os.environ, "SIGNGATE_POLICY": str(policy), "SIGNGATE_ROTATION_STEP": step}
    try:
        process = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", command, stdin=subprocess.DEVNULL, stdout=STDERR, env=env
        )
    except OSError as e:
        raise PolicyError(f"--policy-hook could not start: {e.strerror or e}") from e
    code = await process.wait()
    if code == 0:
        return
    ended = f"exited {code}"
    if code < 0:
        try:
            ended = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            ended = f"was killed by signal {-code}"
    raise PolicyError(
        f"--policy-hook {ended} after the {step} edit, so the verifiers may not have the "
        "policy; fix it and run the same command again (the hook runs again)"
    )
