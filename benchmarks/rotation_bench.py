"""Rotate a registry's signatures to a new key: ``signgate rotate`` against the seed's pipeline.

The seed's rotation (see /work/shared/seed): list every signed image, delete all signature data,
make a new key, re-sign everything. Done with the real cosign 2 CLI that is ``cosign clean`` of
each image, then ``cosign sign --key NEW.key`` of each digest, one after the other. signgate
does the whole rotation in one command: plan, trust both keys in the policy, re-sign with NEW
(read back and verified), retire OLD from the policy, remove OLD's signatures.

For each N, and for each tool, a fresh docker-registry on loopback (storage in /dev/shm) gets the
same N images over REPOSITORIES repositories, pushed concurrently by the library, and each is
signed by OLD (the library's classic ``sha256-HEX.sig`` signatures). Then, timed as one wall time:

- signgate: ``signgate rotate --old-key OLD.pub --new-key NEW.key --policy P --journal J
  --propagation-delay 0 HOST`` as a subprocess under GNU time (its peak RSS). Best of
  ``--runs``, each on a fresh registry. The delay, a fixed sleep for verifiers' caches between
  trusting NEW and cleaning (360 s by default), is set to 0: it is the same at any N.
- the seed with cosign 2: ``cosign clean --type signature -f IMAGE@DIGEST`` per digest, then
  ``cosign sign --key NEW.key --tlog-upload=false -y IMAGE@DIGEST`` per digest. The list of
  signed digests is given to it for free (the seed's listing script is not timed), and the new
  key is made beforehand for both tools, so both measure clean-up and re-signing only.

Neither result is taken on trust: after each run every digest must verify with NEW in one
``signgate verify`` and none with OLD; after signgate's, the policy must trust NEW and not OLD.

Run from the project root: .venv/bin/python -m benchmarks.rotation_bench
[--sizes 100,500,1000] [--cosign-sizes 100,500] [--runs 1] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.integration.registry_servers import running_registry
from tests.integration.tools import tool_env

from benchmarks.verify_bench import (
    GNU_TIME,
    PASSWORD,
    REPOSITORIES,
    SIGNGATE,
    Measurement,
    push_images,
    timed,
)
from benchmarks.webhook_bench import COSIGN, load_average, met
from signgate.keys import fixed_password, load_signer
from signgate.keys.files import KeyPairFiles, generate_key_pair
from signgate.keys.model import Signer
from signgate.reference import ImageReference
from signgate.registry import RegistryClient, RegistryOptions
from signgate.signatures.formats import SignatureFormat
from signgate.signatures.sign import sign_images

TARGET_RATIO = 10.0
QUICK_SIZES, QUICK_COSIGN_SIZES = "20,50,100", "20"


@dataclass(frozen=True)
class Keys:
    old: KeyPairFiles
    new: KeyPairFiles


@dataclass(frozen=True)
class SigngateRun:
    size: int
    best: Measurement
    all_seconds: tuple[float, ...]
    report: dict[str, object]
    load_before: str
    cpu_seconds: float


@dataclass(frozen=True)
class CosignRun:
    size: int
    clean_seconds: float
    sign_seconds: float
    load_before: str
    cpu_seconds: float

    @property
    def seconds(self) -> float:
        return self.clean_seconds + self.sign_seconds


def children_cpu_seconds() -> float:
    """User and system time of every child process waited for so far (theirs included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def progress(message: str) -> None:
    print(f"rotation_bench: {message}", file=sys.stderr, flush=True)


def make_keys(work: Path) -> Keys:
    password = fixed_password(PASSWORD.encode())
    return Keys(generate_key_pair(work / "old", password),
                generate_key_pair(work / "new", password))


async def push_signed_by_old(host: str, count: int, old: Signer) -> list[str]:
    """``count`` images signed by OLD; their ``repo@digest`` references.

    The classic format, named explicitly: cosign 2, the seed's tool, reads only that, and the
    library's default is cosign 3's bundle.
    """
    tagged = [ImageReference.parse(r) for r in await push_images(host, count)]
    async with RegistryClient(RegistryOptions()) as client:
        outcomes = await sign_images(client, old, tagged,
                                     signature_format=SignatureFormat.CLASSIC)
    pinned = []
    for outcome in outcomes:
        if outcome.error is not None or len(outcome.signed) != 1:
            raise SystemExit(f"signing {outcome.reference} with OLD failed: {outcome.error}")
        pinned.append(f"{outcome.reference.repository}@{outcome.signed[0].digest}")
    return pinned


@contextmanager
def registry_signed_by_old(
    scratch: Path, name: str, count: int, old: Signer
) -> Iterator[tuple[str, list[str]]]:
    """A fresh registry holding ``count`` images signed by OLD: its host and the digests."""
    with running_registry(scratch / name) as registry:
        yield registry.host, asyncio.run(push_signed_by_old(registry.host, count, old))


def write_policy(path: Path, host: str, key: Path) -> None:
    path.write_text(
        f"unmatched: deny\nrules:\n  - name: bench\n    images: [\"{host}/**\"]\n"
        f"    keys: [{key}]\n"
    )


def require_rotated(env: dict[str, str], keys: Keys, digests: Sequence[str], who: str) -> None:
    """Every digest verifies with NEW (one command), and none with OLD."""
    with_new = subprocess.run(
        [str(SIGNGATE), "verify", "--key", str(keys.new.public_key), *digests],
        env=env, capture_output=True, text=True, check=False,
    )
    if with_new.returncode != 0:
        failures = [line for line in with_new.stderr.splitlines() if line.startswith("signgate:")]
        raise SystemExit(f"{who}: {len(failures)} of {len(digests)} digests do not verify with "
                         f"NEW, e.g. {failures[:3]}")
    with_old = subprocess.run(
        [str(SIGNGATE), "verify", "--key", str(keys.old.public_key), *digests],
        env=env, capture_output=True, text=True, check=False,
    )
    refused = [line for line in with_old.stderr.splitlines() if line.startswith("signgate:")]
    if len(refused) != len(digests):
        raise SystemExit(f"{who}: {len(digests) - len(refused)} of {len(digests)} digests "
                         "still verify with OLD")


def run_signgate(
    scratch: Path, env: dict[str, str], keys: Keys, old: Signer, size: int, runs: int
) -> SigngateRun:
    measurements, reports, loads, cpu = [], [], [], []
    for attempt in range(runs):
        run_dir = scratch / f"signgate-{size}-{attempt}"
        run_dir.mkdir()
        progress(f"N={size}: preparing a registry for signgate (run {attempt + 1}/{runs})")
        with registry_signed_by_old(run_dir, "registry", size, old) as (host, digests):
            policy, journal, report = (run_dir / n for n in ("policy.yaml", "rotate.journal",
                                                             "report.json"))
            write_policy(policy, host, keys.old.public_key)
            progress(f"N={size}: signgate rotate")
            loads.append(load_average().split()[0])
            cpu_before = children_cpu_seconds()
            # timed() discards stdout; the shell execs signgate in its own place, so GNU time
            # still measures signgate's process, and the report lands in a file.
            # --propagation-delay 0: by default rotate sleeps 360 s between trusting NEW and
            # cleaning, for verifiers' caches to expire; a fixed wait, the same at any N, that
            # no verifier here needs (the seed's pipeline has none either).
            measurements.append(timed(
                ["/bin/sh", "-c", f'exec "$0" "$@" > {shlex.quote(str(report))}',
                 str(SIGNGATE), "rotate",
                 "--old-key", str(keys.old.public_key), "--new-key", str(keys.new.private_key),
                 "--policy", str(policy), "--journal", str(journal), "--propagation-delay", "0",
                 host],
                env, 1,
            ))
            cpu.append(children_cpu_seconds() - cpu_before)
            summary = json.loads(report.read_text())
            if not summary["finished"] or summary["resigned"] != size:
                raise SystemExit(f"signgate rotate at N={size} did not finish: {summary}")
            require_rotated(env, keys, digests, f"signgate at N={size}")
            rules = policy.read_text()
            if str(keys.new.public_key) not in rules or str(keys.old.public_key) in rules:
                raise SystemExit(f"signgate at N={size}: the policy was not rotated:\n{rules}")
            reports.append(summary)
    best = min(range(runs), key=lambda i: measurements[i].median_seconds)
    peak = max(m.peak_rss_mib for m in measurements)
    return SigngateRun(
        size,
        Measurement(measurements[best].median_seconds, runs, peak),
        tuple(m.median_seconds for m in measurements),
        reports[best],
        loads[best],
        cpu[best],
    )


def cosign_loop(argvs: Sequence[Sequence[str]], env: dict[str, str]) -> float:
    """Seconds to run every command in turn; each must succeed."""
    start = time.perf_counter()
    for argv in argvs:
        result = subprocess.run(list(argv), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, check=False)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({result.returncode}): "
                             f"{result.stderr[-2000:]!r}")
    return time.perf_counter() - start


def run_cosign(scratch: Path, env: dict[str, str], keys: Keys, old: Signer, size: int) -> CosignRun:
    run_dir = scratch / f"cosign-{size}"
    run_dir.mkdir()
    progress(f"N={size}: preparing a registry for the cosign loop")
    with registry_signed_by_old(run_dir, "registry", size, old) as (_, digests):
        progress(f"N={size}: cosign clean, then cosign sign, per digest")
        load_before = load_average().split()[0]
        cpu_before = children_cpu_seconds()
        clean = cosign_loop(
            [[str(COSIGN), "clean", "--type", "signature", "-f", "--allow-insecure-registry",
              digest] for digest in digests],
            env,
        )
        sign = cosign_loop(
            [[str(COSIGN), "sign", "--key", str(keys.new.private_key), "--tlog-upload=false", "-y",
              "--allow-insecure-registry", digest] for digest in digests],
            env,
        )
        cpu = children_cpu_seconds() - cpu_before
        require_rotated(env, keys, digests, f"cosign at N={size}")
    return CosignRun(size, clean, sign, load_before, cpu)


def report_seed(signgate: dict[int, SigngateRun], cosign: Sequence[CosignRun]) -> None:
    print("\n## the seed's pipeline with cosign 2 against `signgate rotate`\n")
    print("| N | signgate (s) | cosign loop (s) | of which clean (s) | of which sign (s) | "
          "cosign / signgate | signgate ms/digest | cosign ms/digest | signgate CPU (s) | "
          "cosign CPU (s) | CPU cosign / signgate | load before, 1-min (signgate; cosign) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for c in cosign:
        ours = signgate[c.size]
        wall = ours.best.median_seconds
        print(f"| {c.size} | {wall:.2f} | {c.seconds:.2f} | {c.clean_seconds:.2f} | "
              f"{c.sign_seconds:.2f} | {c.seconds / wall:.1f}x | {wall / c.size * 1000:.1f} | "
              f"{c.seconds / c.size * 1000:.1f} | {ours.cpu_seconds:.2f} | {c.cpu_seconds:.2f} | "
              f"{c.cpu_seconds / ours.cpu_seconds:.1f}x | {ours.load_before}; "
              f"{c.load_before} |")
    largest = max(cosign, key=lambda c: c.size)
    ratio = largest.seconds / signgate[largest.size].best.median_seconds
    print(f"\ntarget at N={largest.size}: cosign / signgate >= {TARGET_RATIO:g}x (wall): "
          f"{ratio:.1f}x, {met(ratio >= TARGET_RATIO)}. signgate's time is the whole rotation "
          "(inventory, policy trust, re-sign with read-back, policy retire, clean) including "
          "its start-up; cosign's is clean-up and re-signing only, the list of digests given. "
          "CPU: user + system seconds of the tool's own processes (not the registry's), which "
          "other work on the machine disturbs less than wall time.")


def report_growth(signgate: dict[int, SigngateRun]) -> None:
    sizes = sorted(signgate)
    base = signgate[sizes[0]].best.median_seconds / sizes[0]
    print("\n## growth of `signgate rotate` with N\n")
    print(f"| N | seconds | ms/digest | per-digest / N={sizes[0]} | rotation's own seconds | "
          "CPU ms/digest | peak RSS (MiB) | retried responses | runs (s) | "
          "load before, 1-min |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for size in sizes:
        run = signgate[size]
        per_digest = run.best.median_seconds / size
        print(f"| {size} | {run.best.median_seconds:.2f} | {per_digest * 1000:.1f} | "
              f"{per_digest / base:.2f} | {run.report['seconds']} | "
              f"{run.cpu_seconds / size * 1000:.1f} | {run.best.peak_rss_mib:.0f} | "
              f"{run.report['retried_responses']} | "
              f"{', '.join(f'{s:.2f}' for s in run.all_seconds)} | {run.load_before} |")
    print("\nlinear growth: per-digest time flat (ratio near 1, or falling as start-up is spread "
          "over more digests). Rotation's own seconds: the report's figure, without start-up.")


def parse_sizes(text: str) -> list[int]:
    return sorted({int(s) for s in text.split(",") if s.strip()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", help="digests to rotate with signgate (default 100,500,1000)")
    parser.add_argument("--cosign-sizes",
                        help="digests to rotate with the cosign loop (default 100,500)")
    parser.add_argument("--runs", type=int, default=1,
                        help="signgate runs per N, each on a fresh registry; the best is shown")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: sizes {QUICK_SIZES}, cosign at {QUICK_COSIGN_SIZES}")
    args = parser.parse_args()
    sizes = parse_sizes(args.sizes or (QUICK_SIZES if args.quick else "100,500,1000"))
    cosign_sizes = parse_sizes(args.cosign_sizes or (QUICK_COSIGN_SIZES if args.quick
                                                     else "100,500"))
    if not set(cosign_sizes) <= set(sizes):
        raise SystemExit("--cosign-sizes must be among --sizes (the ratio needs both)")
    for tool in (Path(GNU_TIME), COSIGN, SIGNGATE):
        if not tool.exists():
            raise SystemExit(f"{tool} not found; run scripts/setup.sh")

    started = time.perf_counter()
    load_at_start = load_average()
    with tempfile.TemporaryDirectory(
        prefix="signgate-rotation-bench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None
    ) as scratch_name:
        scratch = Path(scratch_name)
        work = scratch / "work"
        work.mkdir()
        env = tool_env(work, COSIGN_PASSWORD=PASSWORD)
        keys = make_keys(work)
        old = load_signer(str(keys.old.private_key), fixed_password(PASSWORD.encode()))
        signgate, cosign = {}, []
        # Each N's two measurements back to back, so that both meet about the same load from
        # the other work on this machine.
        for size in sizes:
            signgate[size] = run_signgate(scratch, env, keys, old, size, args.runs)
            if size in cosign_sizes:
                cosign.append(run_cosign(scratch, env, keys, old, size))

    print("\n# signgate rotate benchmark\n")
    print(f"{os.cpu_count()} CPUs; load average at start {load_at_start}, at end "
          f"{load_average()}; Python {sys.version.split()[0]}; images over {REPOSITORIES} "
          f"repositories; total {time.perf_counter() - started:.0f} s")
    report_seed(signgate, cosign)
    report_growth(signgate)


if __name__ == "__main__":
    main()
