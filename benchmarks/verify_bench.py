"""Verify N images with `signgate verify` and with the real `cosign verify`, in one run.

Both tools get all N references in one command, against the same local docker-registry, and are
timed alike (wall time of the whole command, median of several runs; peak RSS of the process).
Start-up is measured separately: Python's start-up is the floor for N = 1.

Run from the project root: .venv/bin/python -m benchmarks.verify_bench [--sizes 1,50,500]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.integration.registry_servers import running_registry

from signgate.reference import Repository
from signgate.registry import RegistryClient, RegistryOptions
from signgate.registry.images import push_image

ROOT = Path(__file__).resolve().parents[1]
TOOLS = Path(os.environ.get("SIGNGATE_TOOLS", ROOT / ".tools" / "bin"))
SIGNGATE = Path(sys.executable).with_name("signgate")
REPOSITORIES = 10
PASSWORD = "benchmark"


@dataclass(frozen=True)
class Measurement:
    median_seconds: float
    runs: int
    peak_rss_mib: float


def timed(argv: Sequence[str], env: dict[str, str], cwd: Path, runs: int) -> Measurement:
    """Median wall time and peak RSS of ``argv`` over ``runs`` runs; it must succeed."""
    times, peaks = [], []
    for _ in range(runs):
        start = time.perf_counter()
        process = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        assert process.stderr is not None
        stderr = process.stderr.read()
        _, status, usage = os.wait4(process.pid, 0)
        times.append(time.perf_counter() - start)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            raise SystemExit(f"{argv[0]} failed ({process.returncode}): {stderr[-2000:]!r}")
        peaks.append(usage.ru_maxrss / 1024)
    return Measurement(statistics.median(times), runs, max(peaks))


async def push_images(host: str, count: int) -> list[str]:
    """``count`` distinct images over REPOSITORIES repositories; their tagged references."""
    limit = asyncio.Semaphore(32)

    async def one(client: RegistryClient, i: int) -> str:
        repository = Repository(host, f"bench/app{i % REPOSITORIES}")
        async with limit:
            await push_image(client, repository, f"v{i}", content=f"image {i}".encode())
        return f"{repository}:v{i}"

    async with RegistryClient(RegistryOptions()) as client:
        return list(await asyncio.gather(*(one(client, i) for i in range(count))))


def runs_for(size: int) -> int:
    return 10 if size == 1 else 5 if size <= 50 else 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1,50,500")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    cosigns = {name: TOOLS / name for name in ("cosign2", "cosign3")}
    for name, path in cosigns.items():
        if not path.exists():
            raise SystemExit(f"{name} not found at {path}; run scripts/setup.sh")

    with tempfile.TemporaryDirectory() as scratch, running_registry(Path(scratch) / "reg") as reg:
        work = Path(scratch)
        env = {**os.environ, "COSIGN_PASSWORD": PASSWORD, "HOME": str(work)}
        subprocess.run([SIGNGATE, "generate-key-pair"], env=env, cwd=work, check=True)
        references = asyncio.run(push_images(reg.host, max(sizes)))
        sign_time = timed([str(SIGNGATE), "sign", "--key", "cosign.key", *references], env, work, 1)

        rows = []
        for size in sizes:
            refs = references[:size]
            runs = runs_for(size)
            ours = timed([str(SIGNGATE), "verify", "--key", "cosign.pub", *refs], env, work, runs)
            theirs = {
                name: timed(
                    [str(path), "verify", "--key", "cosign.pub", "--insecure-ignore-tlog",
                     "--allow-insecure-registry", *refs],
                    env, work, runs,
                )
                for name, path in cosigns.items()
            }
            rows.append((size, ours, theirs))

        startup = {
            "python3 -c pass": timed([sys.executable, "-c", "pass"], env, work, 10),
            "signgate --version": timed([str(SIGNGATE), "--version"], env, work, 10),
            "signgate verify --help": timed([str(SIGNGATE), "verify", "--help"], env, work, 10),
            "cosign2 version": timed([str(cosigns["cosign2"]), "version"], env, work, 10),
        }

    print(f"\n## verify: N images over {REPOSITORIES} repositories, one command each\n")
    print("| N | signgate (s) | cosign 2 (s) | cosign 2 / signgate | cosign 3 (s) | "
          "cosign 3 / signgate | signgate peak RSS (MiB) | cosign 2 peak RSS (MiB) | runs |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size, ours, theirs in rows:
        c2, c3 = theirs["cosign2"], theirs["cosign3"]
        print(
            f"| {size} | {ours.median_seconds:.3f} | {c2.median_seconds:.3f} | "
            f"{c2.median_seconds / ours.median_seconds:.2f}x | {c3.median_seconds:.3f} | "
            f"{c3.median_seconds / ours.median_seconds:.2f}x | {ours.peak_rss_mib:.0f} | "
            f"{c2.peak_rss_mib:.0f} | {ours.runs} |"
        )
    print("\n## start-up (median of 10)\n")
    print("| command | seconds | peak RSS (MiB) |")
    print("|---|---:|---:|")
    for name, m in startup.items():
        print(f"| {name} | {m.median_seconds:.3f} | {m.peak_rss_mib:.0f} |")
    print(f"\nsigning {max(sizes)} images with one `signgate sign`: "
          f"{sign_time.median_seconds:.2f} s")
    print("\ntargets: N=500 cosign/signgate >= 2x; N=50 >= 1x; N=1 signgate <= 5x cosign")


if __name__ == "__main__":
    main()
