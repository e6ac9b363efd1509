from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from signgate.errors import UsageError
from signgate.keys.refs import can_disable
from signgate.rotation.settings import (
    GivenSettings,
    RotationSettings,
    Shard,
    check_key_version_refs,
    is_key_version_rotation,
    kms_key_name,
    new_key_step,
    parse_shard,
    resolve_settings,
)


@pytest.mark.parametrize(
    ("text", "shard"),
    [("0/1", Shard(0, 1)), ("2/3", Shard(2, 3)), (" 0/16 ", Shard(0, 16)), ("9/10", Shard(9, 10))],
)
def test_a_shard_is_i_of_n(text: str, shard: Shard) -> None:
    assert parse_shard(text) == shard
    assert str(shard) == text.strip()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("3/3", "I must be from 0 to 2"),
        ("1/1", "I must be from 0 to 0"),
        ("0/0", "N must be at least 1"),
        ("-1/3", "want I/N"),
        ("1", "want I/N"),
        ("a/b", "want I/N"),
        ("1/2/3", "want I/N"),
    ],
)
def test_a_shard_outside_its_range_is_refused(text: str, problem: str) -> None:
    with pytest.raises(UsageError, match=problem):
        parse_shard(text)


def test_every_repository_is_in_exactly_one_shard_by_its_name() -> None:
    names = [f"team-{i}/service-{j}" for i in range(10) for j in range(30)]
    shards = [Shard(i, 4) for i in range(4)]
    owners = [[s.index for s in shards if s.holds(name)] for name in names]
    assert all(len(o) == 1 for o in owners)
    sizes = Counter(o[0] for o in owners)
    assert all(50 <= sizes[i] <= 100 for i in range(4)), sizes  # about 75 each
    assert Shard(0, 1).holds("anything")


@pytest.mark.parametrize(
    ("name", "of_3", "of_7"), [("team/app", 2, 2), ("library/nginx", 0, 1), ("a", 1, 4)]
)
def test_the_share_is_pinned(name: str, of_3: int, of_7: int) -> None:
    # Shards that run different signgate versions must still agree: the hash never changes.
    assert Shard(of_3, 3).holds(name)
    assert Shard(of_7, 7).holds(name)


@pytest.mark.parametrize(
    ("ref", "name"),
    [
        ("hashivault://release?version=3", ("hashivault://release", True)),
        ("hashivault://release", ("hashivault://release", False)),
        ("openbao://k.v-1?version=12", ("openbao://k.v-1", True)),
        (
            "gcpkms://projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/2",
            ("gcpkms://projects/p/locations/l/keyRings/r/cryptoKeys/k", True),
        ),
        ("azurekms://vault.example/key/0123abcd", ("azurekms://vault.example/key", True)),
        ("azurekms://vault.example/key", ("azurekms://vault.example/key", False)),
        ("awskms:///alias/release", None),
        ("cosign.key", None),
        ("env://KEY", None),
    ],
)
def test_the_kms_key_a_reference_names(ref: str, name: tuple[str, bool] | None) -> None:
    assert kms_key_name(ref) == name


def test_a_key_version_rotation_is_two_versions_of_one_kms_key() -> None:
    assert is_key_version_rotation("hashivault://release?version=1", "hashivault://release")
    assert is_key_version_rotation("hashivault://release?version=1", "hashivault://release?version=2")
    assert not is_key_version_rotation("hashivault://release?version=1", "openbao://release")
    assert not is_key_version_rotation("hashivault://old", "hashivault://new")
    assert not is_key_version_rotation("awskms:///alias/a", "awskms:///alias/a")
    assert not is_key_version_rotation("old.pub", "new.key")
    check_key_version_refs("hashivault://release?version=1", "hashivault://release")
    with pytest.raises(UsageError, match="name OLD's version"):
        check_key_version_refs("hashivault://release", "hashivault://release")


SETTINGS = RotationSettings(
    target="reg.example/team",
    old_ref="/keys/old.pub",
    new_ref="hashivault://new",
    new_policy_ref="hashivault://new",
    policy="/etc/policy.yaml",
    shard=Shard(1, 3),
    repositories=("team/*",),
    signature_repository=None,
)
FULL = GivenSettings(**SETTINGS.__dict__)


def test_a_new_journal_takes_the_options_given() -> None:
    assert resolve_settings(None, FULL, "j") == SETTINGS


def test_resume_reads_the_options_from_the_journal() -> None:
    header = SETTINGS.header()
    assert resolve_settings(header, GivenSettings(), "j") == SETTINGS
    assert resolve_settings(header, FULL, "j") == SETTINGS
    assert header["shard"] == "1/3"


@pytest.mark.parametrize(
    ("change", "flag"),
    [
        ({"shard": Shard(0, 3)}, "--shard was 1/3"),
        ({"shard": Shard(1, 4)}, "--shard was 1/3"),
        ({"target": "reg.example/other"}, "REGISTRY"),
        ({"old_ref": "/keys/other.pub"}, "--old-key was /keys/old.pub"),
        ({"new_ref": "hashivault://newer"}, "--new-key"),
        ({"policy": "/tmp/p.yaml"}, "--policy"),
        ({"repositories": ("x/*",)}, "--repositories was team/"),
        ({"disable_old_key": True}, "--disable-old-key was off"),
        ({"create_new_key": True}, "--create-new-key was off"),
    ],
)
def test_a_journal_started_for_another_rotation_is_refused(
    change: dict[str, Any], flag: str
) -> None:
    given = GivenSettings(**{**FULL.__dict__, **change})
    with pytest.raises(UsageError, match="belongs to another rotation") as refused:
        resolve_settings(SETTINGS.header(), given, "j")
    assert flag in refused.value.diagnostics()


def test_cosign_repository_must_stay_as_it_was() -> None:
    header = {**SETTINGS.header(), "signature_repository": "reg.example/sigs"}
    with pytest.raises(UsageError, match=r"COSIGN_REPOSITORY=reg\.example/sigs"):
        resolve_settings(header, GivenSettings(), "j")
    resumed = resolve_settings(header, GivenSettings(signature_repository="reg.example/sigs"), "j")
    assert resumed.signature_repository == "reg.example/sigs"
    with pytest.raises(UsageError, match=r"COSIGN_REPOSITORY=\(unset\)"):
        resolve_settings(SETTINGS.header(), GivenSettings(signature_repository="r.x/s"), "j")


@pytest.mark.parametrize(
    "old_ref",
    [
        "hashivault://release?version=3",
        "openbao://release?version=1",
        "awskms:///alias/release",
        "gcpkms://projects/p/locations/l/keyRings/r/cryptoKeys/k",
        "azurekms://vault.example/key/0123abcd",
        "pkcs11:token=t;object=o",
    ],
)
def test_disable_old_key_is_accepted_where_the_kms_can_disable(old_ref: str) -> None:
    given = GivenSettings(target="r.example", old_ref=old_ref, new_ref="n.key",
                          new_policy_ref="n.pub", policy="/p", disable_old_key=True)
    assert resolve_settings(None, given, "j").disable_old_key


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        ("hashivault://release?version=3", None),
        ("awskms:///alias/release", None),
        ("pkcs11:token=t;object=o", None),
        ("hashivault://release", "hashivault://release: Transit cannot disable a whole key"),
        ("openbao://release?version=x", "the only query a Transit key reference takes"),
        ("k8s://ns/release", "k8s://ns/release: k8s:// keys cannot be disabled"),
        ("/keys/old.pub", "/keys/old.pub: a key file cannot be disabled"),
        ("env://OLD", "env://OLD: a key in an environment variable cannot be disabled"),
        ("pkcs11:token=t;object=o?pin-value=1234&module-path=/m.so&x=", None),
        ("nope://k", "unknown key reference scheme nope://"),
    ],
)
def test_what_can_be_disabled_is_told_by_the_reference_alone(
    ref: str, reason: str | None
) -> None:
    found = can_disable(ref)
    if reason is None:
        assert found is None
    else:
        assert found is not None
        assert found.startswith(reason) or reason in found
        assert "1234" not in found


def test_verifiers_and_the_hook_come_from_the_journal_unless_given_again() -> None:
    settings = RotationSettings(
        **{**SETTINGS.__dict__, "verifiers": ("https://w.example/metrics",),
           "verifier_cacert": "/ca.pem", "policy_hook": "deliver", "propagation_delay": 0.0}
    )
    header = settings.header()
    assert resolve_settings(header, GivenSettings(), "j") == settings
    assert resolve_settings(header, GivenSettings(propagation_delay=60.0), "j") == (
        RotationSettings(**{**settings.__dict__, "propagation_delay": 60.0}))
    changed = GivenSettings(
        verifiers=("https://w2.example/metrics", "http://127.0.0.1:8443/metrics",
                   "https://w2.example/metrics"),
        policy_hook="deliver again",
    )
    resumed = resolve_settings(header, changed, "j")
    assert resumed.verifiers == ("https://w2.example/metrics", "http://127.0.0.1:8443/metrics")
    assert resumed.policy_hook == "deliver again"
    assert resumed.verifier_cacert == "/ca.pem"
    # A journal written before these options: none.
    old_header = {k: v for k, v in SETTINGS.header().items()
                  if k not in ("verifiers", "verifier_cacert", "policy_hook",
                               "propagation_delay")}
    assert resolve_settings(old_header, GivenSettings(), "j") == SETTINGS


def test_a_secret_in_a_reference_is_not_journalled() -> None:
    pkcs11 = "pkcs11:token=t;object=o?module-path=/m.so&pin-value=1234"
    settings = RotationSettings(**{**SETTINGS.__dict__, "new_ref": pkcs11})
    header = settings.header()
    assert "1234" not in str(header)
    with pytest.raises(UsageError, match="give --new-key again"):
        resolve_settings(header, GivenSettings(), "j")
    assert resolve_settings(header, GivenSettings(new_ref=pkcs11), "j").new_ref == pkcs11


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        (GivenSettings(), "rotate needs REGISTRY"),
        (GivenSettings(target="r.example"), "rotate needs --old-key"),
        (GivenSettings(target="r.example", old_ref="o.pub", new_ref="n.key",
                       new_policy_ref="n.pub"), "rotate needs --policy"),
        (GivenSettings(target="r.example", old_ref="/o.pub", new_ref="hashivault://n",
                       new_policy_ref="hashivault://n", policy="/p", disable_old_key=True),
         "--disable-old-key: /o.pub: a key file cannot be disabled"),
        (GivenSettings(target="r.example", old_ref="env://OLD", new_ref="hashivault://n",
                       new_policy_ref="hashivault://n", policy="/p", disable_old_key=True),
         "cannot be disabled"),
        (GivenSettings(target="r.example", old_ref="k8s://ns/old", new_ref="hashivault://n",
                       new_policy_ref="hashivault://n", policy="/p", disable_old_key=True),
         "k8s:// keys cannot be disabled: their store has no disabled state"),
        (GivenSettings(target="r.example", old_ref="hashivault://old", new_ref="hashivault://n",
                       new_policy_ref="hashivault://n", policy="/p", disable_old_key=True),
         "Transit cannot disable a whole key"),
        (GivenSettings(target="r.example", old_ref="/o.pub", new_ref="n.key",
                       new_policy_ref="n.pub", policy="/p", verifiers=("http://webhook:9/m",)),
         "plain http only to a loopback address"),
        (GivenSettings(target="r.example", old_ref="/o.pub", new_ref="n.key",
                       new_policy_ref="n.pub", policy="/p", verifiers=("ftp://w/metrics",)),
         "want the webhook's metrics URL"),
        (GivenSettings(target="r.example", old_ref="hashivault://k", new_ref="hashivault://k",
                       new_policy_ref="hashivault://k", policy="/p"), "name OLD's version"),
        (GivenSettings(target="r.example", old_ref="/o.pub", new_ref="hashivault://n",
                       new_policy_ref="hashivault://n", policy="/p", create_new_key=True,
                       shard=Shard(0, 2)), "create NEW once"),
    ],
)
def test_what_a_new_rotation_needs(given: GivenSettings, problem: str) -> None:
    with pytest.raises(UsageError, match=problem):
        resolve_settings(None, given, "j")


@pytest.mark.parametrize(
    ("created", "begun", "existing", "step"),
    [
        (None, False, None, "create"),  # a first run
        (None, True, None, "create"),  # crashed before the KMS made it
        (None, True, "K", "adopt"),  # crashed after the KMS made it, before the record
        ("K", True, "K", "use"),  # resumed after the record
    ],
)
def test_new_key_step(created: str | None, begun: bool, existing: str | None, step: str) -> None:
    assert new_key_step(created, begun, existing) == step


def test_a_new_key_this_rotation_did_not_make_is_refused() -> None:
    with pytest.raises(UsageError, match="did not create it"):
        new_key_step(None, False, "K")
    with pytest.raises(UsageError, match=r"not the key this rotation created \(K\): it is L"):
        new_key_step("K", True, "L")
    with pytest.raises(UsageError, match="does not exist"):
        new_key_step("K", True, None)
