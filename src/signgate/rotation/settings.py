"""What a rotation was started with, kept in its journal so that a resumed run does the same.

Pure: the CLI turns its options into absolute paths and normalised names first; this module
compares them with the journal's header and decides. Also the two rules that need no I/O: a
stable share of repositories per shard, and whether OLD and NEW are versions of one KMS key.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from signgate.errors import UsageError
from signgate.keys.refs import can_disable, display_key_ref, split_key_ref
from signgate.rotation.verifiers import verifier_urls

_SHARD = re.compile(r"^([0-9]+)/([0-9]+)$")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the repositories whose name hashes to ``index``."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, repository_path: str) -> bool:
        """Whether the repository (its name in the registry, without the host) is ours.

        A hash of the name, not a position in the catalog: a repository pushed or deleted
        while the shards run moves no other repository to another shard.
        """
        digest = hashlib.sha256(repository_path.encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index


def parse_shard(text: str) -> Shard:
    """``I/N`` with ``0 <= I < N``; a :class:`UsageError` naming the problem otherwise."""
    match = _SHARD.match(text.strip())
    if match is None:
        raise UsageError(f"--shard {text!r}: want I/N, as in 0/4 (shard 0 of 4)")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1:
        raise UsageError(f"--shard {text}: N must be at least 1")
    if index >= count:
        raise UsageError(f"--shard {text}: I must be from 0 to {count - 1}")
    return Shard(index, count)


def _without_version(scheme: str, location: str) -> str | None:
    """``location`` without the part that names a key version, for KMSs whose keys have
    versions; None for other schemes."""
    if scheme in ("hashivault", "openbao"):
        return re.sub(r"\?version=[0-9]+$", "", location)
    if scheme == "gcpkms":
        return re.sub(r"/cryptoKeyVersions/[^/]+$", "", location)
    if scheme == "azurekms":  # VAULT-HOST/KEY[/VERSION]
        return "/".join(location.split("/")[:2])
    return None


def kms_key_name(ref: str) -> tuple[str, bool] | None:
    """(the reference without its version, whether it named one) for KMSs whose keys have
    versions; None for any other reference."""
    scheme, location = split_key_ref(ref)
    base = _without_version(scheme, location)
    if base is None:
        return None
    return f"{scheme}://{base}", base != location


def is_key_version_rotation(old_ref: str, new_ref: str) -> bool:
    """Whether OLD and NEW are versions of one KMS key (NEW a version added to OLD's key),
    rather than two keys."""
    old, new = kms_key_name(old_ref), kms_key_name(new_ref)
    return old is not None and new is not None and old[0] == new[0]


def check_key_version_refs(old_ref: str, new_ref: str) -> None:
    """In a key-version rotation OLD must name its version: without one it would mean the
    latest version, which becomes NEW."""
    if not is_key_version_rotation(old_ref, new_ref):
        return
    old = kms_key_name(old_ref)
    if old is not None and not old[1]:
        raise UsageError(
            f"--old-key {display_key_ref(old_ref)} and --new-key {display_key_ref(new_ref)} "
            "are the same KMS key: name OLD's version (for Transit KEY?version=N), since "
            "the key without a version means its latest version, NEW"
        )


@dataclass(frozen=True)
class RotationSettings:
    """A rotation's parameters. Key references are absolute for files; ``policy`` is an
    absolute path; ``target`` is ``REGISTRY[/PREFIX]`` normalised."""

    target: str
    old_ref: str
    new_ref: str
    new_policy_ref: str
    policy: str
    shard: Shard | None = None
    repositories: tuple[str, ...] = ()
    signature_repository: str | None = None
    create_new_key: bool = False
    disable_old_key: bool = False
    verifiers: tuple[str, ...] = ()
    verifier_cacert: str | None = None
    policy_hook: str | None = None
    propagation_delay: float | None = None

    @property
    def key_version_rotation(self) -> bool:
        return is_key_version_rotation(self.old_ref, self.new_ref)

    def header(self) -> dict[str, Any]:
        """The journal's ``start`` record for these settings (secrets in references are
        replaced by ``***``: a resumed run must be given those references again)."""
        return {
            "type": "start",
            "target": self.target,
            "old_ref": display_key_ref(self.old_ref),
            "new_ref": display_key_ref(self.new_ref),
            "new_policy_ref": display_key_ref(self.new_policy_ref),
            "policy": self.policy,
            "shard": None if self.shard is None else str(self.shard),
            "repositories": list(self.repositories),
            "signature_repository": self.signature_repository,
            "create_new_key": self.create_new_key,
            "disable_old_key": self.disable_old_key,
            "verifiers": list(self.verifiers),
            "verifier_cacert": self.verifier_cacert,
            "policy_hook": self.policy_hook,
            "propagation_delay": self.propagation_delay,
        }


@dataclass(frozen=True)
class GivenSettings:
    """The options of one ``rotate`` command; None (or False, or empty) where not given.
    ``signature_repository`` is always given: it comes from ``COSIGN_REPOSITORY``.

    ``verifiers``, ``verifier_cacert``, ``policy_hook`` and ``propagation_delay`` may change
    from run to run (a verifier's address, the cluster's credentials); when not given, the
    journal's are used.
    """

    target: str | None = None
    old_ref: str | None = None
    new_ref: str | None = None
    new_policy_ref: str | None = None
    policy: str | None = None
    shard: Shard | None = None
    repositories: tuple[str, ...] = ()
    signature_repository: str | None = None
    create_new_key: bool = False
    disable_old_key: bool = False
    verifiers: tuple[str, ...] = ()
    verifier_cacert: str | None = None
    policy_hook: str | None = None
    propagation_delay: float | None = None


# Options a resumed run takes from the journal when not given again, and may change.
_PER_RUN = ("verifiers", "verifier_cacert", "policy_hook", "propagation_delay")

_OPTION_NAMES = {
    "target": "REGISTRY[/PREFIX]",
    "old_ref": "--old-key",
    "new_ref": "--new-key",
    "new_policy_ref": "--new-public-key",
    "policy": "--policy",
    "shard": "--shard",
    "repositories": "--repositories",
    "create_new_key": "--create-new-key",
    "disable_old_key": "--disable-old-key",
}
_KEY_REFS = ("old_ref", "new_ref", "new_policy_ref")
_REQUIRED = ("target", "old_ref", "new_ref", "new_policy_ref", "policy")


def resolve_settings(
    recorded: Mapping[str, Any] | None, given: GivenSettings, journal: str
) -> RotationSettings:
    """The settings of this run: ``given``, completed from the journal's header ``recorded``
    (None for a new journal). A given option that differs from the recorded one is refused:
    a journal belongs to one rotation."""
    values: dict[str, Any] = {}
    for name, flag in _OPTION_NAMES.items():
        mine = getattr(given, name)
        if recorded is None or name not in recorded:
            values[name] = mine
            continue
        theirs = _recorded_value(name, recorded[name])
        if not mine:
            if name in _KEY_REFS and isinstance(theirs, str) and "***" in theirs:
                raise UsageError(
                    f"{journal}: the journal does not keep the secret in {flag} {theirs}; "
                    f"give {flag} again"
                )
            values[name] = theirs
        elif _shown(name, mine) != _shown(name, theirs):
            raise _another_rotation(journal, flag, theirs)
        else:
            values[name] = mine
    started_with = (recorded or {}).get("signature_repository", given.signature_repository)
    if started_with != given.signature_repository:
        raise UsageError(
            f"{journal}: the rotation was started with COSIGN_REPOSITORY="
            f"{started_with or '(unset)'}, this run has "
            f"{given.signature_repository or '(unset)'}; run it as it was started"
        )
    values["signature_repository"] = given.signature_repository
    for name in _PER_RUN:
        mine = getattr(given, name)
        given_now = mine is not None and mine != ()
        values[name] = mine if given_now else (recorded or {}).get(name, mine)
    values["verifiers"] = verifier_urls([str(url) for url in values["verifiers"] or ()])
    for name in _REQUIRED:
        if not values[name]:
            raise UsageError(f"rotate needs {_OPTION_NAMES[name]}")
    settings = RotationSettings(**values)
    check_key_version_refs(settings.old_ref, settings.new_ref)
    if settings.create_new_key and settings.shard is not None and settings.shard.count > 1:
        raise UsageError(
            "--create-new-key with --shard: each shard would make its own NEW; create NEW "
            "once (or add the key version) before the shards start, and give it as --new-key"
        )
    check_disable_old_key(settings.old_ref, settings.disable_old_key)
    return settings


def check_disable_old_key(old_ref: str, disable_old_key: bool) -> None:
    """Refuse ``--disable-old-key`` for an OLD that cannot be disabled (a key file, a
    Kubernetes Secret, a whole Transit key), before the rotation does anything."""
    if not disable_old_key:
        return
    reason = can_disable(old_ref)
    if reason is not None:
        raise UsageError(f"--disable-old-key: {reason}; drop the option")


def _recorded_value(name: str, value: Any) -> Any:
    if name == "shard":
        return None if value is None else parse_shard(str(value))
    if name == "repositories":
        return tuple(str(v) for v in value or ())
    return value


def _shown(name: str, value: Any) -> Any:
    return display_key_ref(value) if name in _KEY_REFS else value


def _another_rotation(journal: str, flag: str, recorded: Any) -> UsageError:
    shown = recorded
    if isinstance(recorded, tuple):
        shown = " ".join(recorded) or "(none)"
    elif isinstance(recorded, bool):
        shown = "on" if recorded else "off"
    return UsageError(
        f"{journal}: this journal belongs to another rotation ({flag} was {shown}); "
        "use a new journal file"
    )


NewKeyStep = Literal["create", "adopt", "use"]


def new_key_step(
    created_key_id: str | None, creation_begun: bool, existing_key_id: str | None
) -> NewKeyStep:
    """What ``--create-new-key`` does now, from the journal (the key id it recorded as
    created, whether a creation was begun) and the KMS (the key id NEW names now, None if it
    does not exist; in a key-version rotation, None while the latest version is OLD).

    The journal records the creation before the run goes on, so a resumed run never creates
    NEW twice. A crash between the KMS's answer and that record leaves a creation begun and a
    key that exists: it is the one this rotation made, and is adopted. Any other existing NEW
    was made by someone else, and is refused.
    """
    if created_key_id is not None:
        if existing_key_id != created_key_id:
            now = "does not exist" if existing_key_id is None else f"is {existing_key_id}"
            raise UsageError(
                f"--new-key is not the key this rotation created ({created_key_id}): it {now}"
            )
        return "use"
    if existing_key_id is None:
        return "create"
    if creation_begun:
        return "adopt"
    raise UsageError(
        "--create-new-key: NEW exists already and this rotation did not create it; rotate to "
        "it without --create-new-key, or name a key that does not exist yet"
    )
