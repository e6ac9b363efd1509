"""Verify N images with `signgate verify` and with the real `cosign verify`, in one run.

Both tools get all N references in one command, against the same local docker-registry, and are
timed alike (wall time of the whole command, median of several runs; peak RSS of the process).
Start-up is measured separately: Python's start-up is the floor for N = 1.

Run from the project root: .venv/bin/python -m benchmarks.verify_bench [--sizes 1,50,500]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tests.integration.registry_servers import running_registry

from signgate.reference import Repository
from signgate.registry import RegistryClient, RegistryOptions
from signgate.registry.images import push_image

ROOT = Path(__file__).resolve().parents[1]
TOOLS = Path(os.environ.get("SIGNGATE_TOOLS", ROOT / ".tools" / "bin"))
SIGNGATE = Path(sys.executable).with_name("signgate")
GNU_TIME = "/usr/bin/time"
REPOSITORIES = 10
PASSWORD = "benchmark"


@dataclass(frozen=True)
class Measurement:
    median_seconds: float
    runs: int
    peak_rss_mib: float


def timed(argv: Sequence[str], env: dict[str, str], runs: int) -> Measurement:
    """Median wall time and peak RSS of ``argv`` over ``runs`` runs; it must succeed.

    Peak RSS comes from GNU time: a child forked from this (large) Python process would carry
    this process's high-water mark into its own.
    """
    times, peaks = [], []
    with tempfile.NamedTemporaryFile("r") as rss_file:
        for _ in range(runs):
            start = time.perf_counter()
            result = subprocess.run(
                [GNU_TIME, "-f", "%M", "-o", rss_file.name, *argv],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False,
            )
            times.append(time.perf_counter() - start)
            if result.returncode != 0:
                failure = result.stderr[-2000:]
                raise SystemExit(f"{argv[0]} failed ({result.returncode}): {failure!r}")
            rss_file.seek(0)
            peaks.append(int(rss_file.read().split()[-1]) / 1024)
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


def registry_floor(references: Sequence[str], threads: int = 4) -> float:
    """Seconds a minimal client (stdlib http.client, keep-alive, ``threads`` threads) takes to
    make the three requests verification needs per image: the registry's own limit here."""
    accept = "application/vnd.oci.image.manifest.v1+json"

    def work(chunk: Sequence[str]) -> None:
        host, _, _ = chunk[0].partition("/")
        connection = http.client.HTTPConnection(host)

        def get(path: str, media_type: str = accept) -> bytes:
            connection.request("GET", path, headers={"Accept": media_type})
            return connection.getresponse().read()

        for reference in chunk:
            path, _, tag = reference.partition("/")[2].rpartition(":")
            manifest = get(f"/v2/{path}/manifests/{tag}")
            signature_tag = f"sha256-{hashlib.sha256(manifest).hexdigest()}.sig"
            layer = json.loads(get(f"/v2/{path}/manifests/{signature_tag}"))["layers"][0]
            get(f"/v2/{path}/blobs/{layer['digest']}", "*/*")
        connection.close()

    chunks = [list(references[i::threads]) for i in range(threads) if references[i::threads]]
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, chunks))
    return time.perf_counter() - start


def runs_for(size: int) -> int:
    return 10 if size == 1 else 5 if size <= 50 else 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1,50,500")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    cosigns = {name: TOOLS / name for name in ("cosign2", "cosign3")}
    if not Path(GNU_TIME).exists():
        raise SystemExit(f"{GNU_TIME} not found: run scripts/setup.sh (Debian's 'time')")
    for name, path in cosigns.items():
        if not path.exists():
            raise SystemExit(f"{name} not found at {path}; run scripts/setup.sh")

    # Start-up is measured as installed: sources byte-compiled (scripts/setup.sh does it too).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "src")], check=True)
    with tempfile.TemporaryDirectory() as scratch, running_registry(Path(scratch) / "reg") as reg:
        work = Path(scratch)
        os.chdir(work)
        env = {**os.environ, "COSIGN_PASSWORD": PASSWORD, "HOME": str(work)}
        subprocess.run([SIGNGATE, "generate-key-pair"], env=env, cwd=work, check=True)
        references = asyncio.run(push_images(reg.host, max(sizes)))
        sign_time = timed(
            [str(SIGNGATE), "sign", "--format", "classic", "--key", "cosign.key", *references],
            env, 1,
        )

        rows = []
        for size in sizes:
            refs = references[:size]
            runs = runs_for(size)
            ours = timed([str(SIGNGATE), "verify", "--key", "cosign.pub", *refs], env, runs)
            theirs = {
                name: timed(
                    [str(path), "verify", "--key", "cosign.pub", "--insecure-ignore-tlog",
                     "--allow-insecure-registry", *refs],
                    env, runs,
                )
                for name, path in cosigns.items()
            }
            floor = statistics.median(registry_floor(refs) for _ in range(runs))
            rows.append((size, ours, theirs, floor))

        startup = {
            "python3 -c pass": timed([sys.executable, "-c", "pass"], env, 10),
            "signgate --version": timed([str(SIGNGATE), "--version"], env, 10),
            "signgate verify --help": timed([str(SIGNGATE), "verify", "--help"], env, 10),
            "cosign2 version": timed([str(cosigns["cosign2"]), "version"], env, 10),
        }

    print(f"\n## verify: N images over {REPOSITORIES} repositories, one command each\n")
    print("| N | signgate (s) | cosign 2 (s) | cosign 2 / signgate | cosign 3 (s) | "
          "cosign 3 / signgate | registry floor (s) | signgate peak RSS (MiB) | "
          "cosign 2 peak RSS (MiB) | runs |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size, ours, theirs, floor in rows:
        c2, c3 = theirs["cosign2"], theirs["cosign3"]
        print(
            f"| {size} | {ours.median_seconds:.3f} | {c2.median_seconds:.3f} | "
            f"{c2.median_seconds / ours.median_seconds:.2f}x | {c3.median_seconds:.3f} | "
            f"{c3.median_seconds / ours.median_seconds:.2f}x | {floor:.3f} | "
            f"{ours.peak_rss_mib:.0f} | {c2.peak_rss_mib:.0f} | {ours.runs} |"
        )
    print("\nregistry floor: a minimal stdlib client in 4 threads making the same three requests "
          "per image, no start-up; the registry shares this machine's cores with the client.")
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
