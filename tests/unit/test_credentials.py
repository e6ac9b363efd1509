"""Docker config credentials: real config files and real docker-credential-* programs on PATH."""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from signgate.errors import RegistryError
from signgate.registry.credentials import (
    DOCKER_HUB_AUTH_KEY,
    Credentials,
    docker_config_path,
    lookup_credentials,
)

SECRET = "hunter2-secret"
HUB_NAMES = ["index.docker.io", "docker.io", "registry-1.docker.io"]

# A credential helper as docker-credential-helpers defines them: `get` reads the server URL on
# stdin and prints JSON, or "credentials not found in native keychain" with exit status 1.
HELPER_PROGRAM = """#!@PYTHON@
import json
import pathlib
import sys

here = pathlib.Path(__file__).resolve().parent
name = pathlib.Path(__file__).name
server_url = sys.stdin.read()
with open(here / (name + ".calls"), "a") as calls:
    calls.write(json.dumps({"argv": sys.argv[1:], "stdin": server_url}) + "\\n")
replies_file = here / (name + ".replies")
replies = json.loads(replies_file.read_text()) if replies_file.exists() else {}
default = {"stdout": "credentials not found in native keychain\\n", "exit": 1}
reply = replies.get(server_url, default)
sys.stdout.write(reply["stdout"])
sys.exit(reply["exit"])
"""


@dataclass
class HelperProgram:
    """A docker-credential-NAME program in a directory on PATH, answering as told."""

    program: Path

    def answer(self, server_url: str, stdout: str, exit_status: int = 0) -> None:
        replies_file = self.program.with_name(self.program.name + ".replies")
        replies = json.loads(replies_file.read_text()) if replies_file.exists() else {}
        replies[server_url] = {"stdout": stdout, "exit": exit_status}
        replies_file.write_text(json.dumps(replies))

    def store(self, server_url: str, username: str, secret: str) -> None:
        reply = {"ServerURL": server_url, "Username": username, "Secret": secret}
        self.answer(server_url, json.dumps(reply))

    def calls(self) -> list[dict[str, Any]]:
        calls_file = self.program.with_name(self.program.name + ".calls")
        if not calls_file.exists():
            return []
        return [json.loads(line) for line in calls_file.read_text().splitlines()]


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never read the real user's docker config."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "docker"
    directory.mkdir()
    return directory


@pytest.fixture
def make_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], HelperProgram]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")

    def make(name: str) -> HelperProgram:
        program = bin_dir / f"docker-credential-{name}"
        program.write_text(HELPER_PROGRAM.replace("@PYTHON@", sys.executable))
        program.chmod(0o755)
        return HelperProgram(program)

    return make


def write_config(directory: Path, config: object) -> Path:
    path = directory / "config.json"
    path.write_text(json.dumps(config))
    return path


def basic_auth(username: str, password: str) -> str:
    return base64.b64encode(f"{username}:{password}".encode()).decode()


# --- the auths section ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"auth": basic_auth("alice", SECRET)}, Credentials("alice", SECRET)),
        ({"auth": basic_auth("alice", "pa:ss:word")}, Credentials("alice", "pa:ss:word")),
        ({"auth": basic_auth("alice", SECRET + "\x00\x00")}, Credentials("alice", SECRET)),
        ({"username": "bob", "password": SECRET}, Credentials("bob", SECRET)),
        # `auth` wins over the separate fields, as in docker.
        (
            {"auth": basic_auth("alice", SECRET), "username": "bob", "password": "other"},
            Credentials("alice", SECRET),
        ),
        ({"auth": "", "username": "bob", "password": SECRET}, Credentials("bob", SECRET)),
        ({"identitytoken": SECRET}, Credentials("", "", identity_token=SECRET)),
        (
            {"auth": basic_auth("alice", ""), "identitytoken": SECRET},
            Credentials("alice", "", identity_token=SECRET),
        ),
        ({}, None),
        ({"auth": "", "identitytoken": ""}, None),
    ],
)
def test_auths_entry(config_dir: Path, entry: dict[str, str], expected: Credentials | None) -> None:
    write_config(config_dir, {"auths": {"registry.example.com": entry}})
    assert lookup_credentials("registry.example.com", config_dir) == expected


@pytest.mark.parametrize(
    ("key", "registry", "matches"),
    [
        ("registry.example.com", "registry.example.com", True),
        ("https://registry.example.com", "registry.example.com", True),
        ("http://registry.example.com/v2/", "registry.example.com", True),
        ("https://REGISTRY.Example.com/some/path", "registry.example.com", True),
        ("registry.example.com:5000", "registry.example.com:5000", True),
        ("https://registry.example.com:5000/v1/", "registry.example.com:5000", True),
        ("http://[::1]:5000/v2/", "[::1]:5000", True),
        ("localhost:5000", "localhost:5000", True),
        ("registry.example.com:5000", "registry.example.com", False),
        ("registry.example.com", "registry.example.com:5000", False),
        ("other.example.com", "registry.example.com", False),
        ("https://example.com/registry.example.com", "registry.example.com", False),
        ("registry.example.com.evil.test", "registry.example.com", False),
    ],
)
def test_auths_key_is_matched_by_host(
    config_dir: Path, key: str, registry: str, matches: bool
) -> None:
    write_config(config_dir, {"auths": {key: {"auth": basic_auth("alice", SECRET)}}})
    expected = Credentials("alice", SECRET) if matches else None
    assert lookup_credentials(registry, config_dir) == expected


@pytest.mark.parametrize("key", [DOCKER_HUB_AUTH_KEY, *HUB_NAMES, "https://index.docker.io"])
@pytest.mark.parametrize("registry", HUB_NAMES)
def test_docker_hub_names_are_one_registry(config_dir: Path, key: str, registry: str) -> None:
    write_config(config_dir, {"auths": {key: {"auth": basic_auth("hubuser", SECRET)}}})
    assert lookup_credentials(registry, config_dir) == Credentials("hubuser", SECRET)


def test_exact_key_wins_over_a_url_with_the_same_host(config_dir: Path) -> None:
    write_config(
        config_dir,
        {
            "auths": {
                "https://registry.example.com/v2/": {"auth": basic_auth("by-url", SECRET)},
                "registry.example.com": {"auth": basic_auth("by-host", SECRET)},
            }
        },
    )
    assert lookup_credentials("registry.example.com", config_dir) == Credentials("by-host", SECRET)


def test_docker_hub_prefers_the_v1_key(config_dir: Path) -> None:
    write_config(
        config_dir,
        {
            "auths": {
                "docker.io": {"auth": basic_auth("alias", SECRET)},
                DOCKER_HUB_AUTH_KEY: {"auth": basic_auth("canonical", SECRET)},
            }
        },
    )
    assert lookup_credentials("index.docker.io", config_dir) == Credentials("canonical", SECRET)


# --- where the config file is ----------------------------------------------------------------


def test_missing_config_file_means_no_credentials(config_dir: Path) -> None:
    assert lookup_credentials("registry.example.com", config_dir) is None


def test_missing_config_directory_means_no_credentials(tmp_path: Path) -> None:
    assert lookup_credentials("registry.example.com", tmp_path / "absent") is None


def test_unreadable_config_means_no_credentials(config_dir: Path) -> None:
    (config_dir / "config.json").mkdir()
    assert lookup_credentials("registry.example.com", config_dir) is None


def test_empty_config_file_means_no_credentials(config_dir: Path) -> None:
    (config_dir / "config.json").write_text("  \n")
    assert lookup_credentials("registry.example.com", config_dir) is None


def test_docker_config_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_environment = tmp_path / "from-env"
    from_environment.mkdir()
    write_config(from_environment, {"auths": {"r.example": {"auth": basic_auth("env", SECRET)}}})
    monkeypatch.setenv("DOCKER_CONFIG", str(from_environment))
    assert docker_config_path() == from_environment / "config.json"
    assert lookup_credentials("r.example") == Credentials("env", SECRET)


def test_given_directory_overrides_the_environment(
    tmp_path: Path, config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_environment = tmp_path / "from-env"
    from_environment.mkdir()
    write_config(from_environment, {"auths": {"r.example": {"auth": basic_auth("env", SECRET)}}})
    write_config(config_dir, {"auths": {"r.example": {"auth": basic_auth("given", SECRET)}}})
    monkeypatch.setenv("DOCKER_CONFIG", str(from_environment))
    assert lookup_credentials("r.example", config_dir) == Credentials("given", SECRET)


def test_home_docker_directory_is_the_default(tmp_path: Path) -> None:
    home_docker = tmp_path / "home" / ".docker"
    home_docker.mkdir()
    write_config(home_docker, {"auths": {"r.example": {"auth": basic_auth("home", SECRET)}}})
    assert docker_config_path() == home_docker / "config.json"
    assert lookup_credentials("r.example") == Credentials("home", SECRET)


# --- malformed configs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"auths": {"r.example": {"auth": "' + SECRET + '"}', "is not valid JSON"),
        ("[]", "is not a JSON object"),
        ('{"auths": []}', "'auths' is not a JSON object"),
        ('{"credHelpers": "test"}', "'credHelpers' is not a JSON object"),
        ('{"credsStore": 7}', "'credsStore' is not a string"),
        ('{"credHelpers": {"r.example": 7}}', "credHelpers['r.example'] is not a string"),
        ('{"auths": {"r.example": "' + SECRET + '"}}', "auths['r.example'] is not a JSON object"),
        ('{"auths": {"r.example": {"password": 7}}}', "'password' is not a string"),
        (
            '{"auths": {"r.example": {"auth": "' + SECRET + '!"}}}',
            "'auth' is not base64 of user:password",
        ),
        (
            '{"auths": {"r.example": {"auth": "'
            + base64.b64encode(SECRET.encode()).decode()
            + '"}}}',
            "'auth' is not base64 of user:password",
        ),
        (
            '{"auths": {"r.example": {"auth": "'
            + base64.b64encode(b"\xff\xfe:" + SECRET.encode()).decode()
            + '"}}}',
            "'auth' is not base64 of user:password",
        ),
    ],
)
def test_malformed_config_is_a_one_line_error_without_secrets(
    config_dir: Path, content: str, problem: str
) -> None:
    path = config_dir / "config.json"
    path.write_text(content)
    with pytest.raises(RegistryError) as caught:
        lookup_credentials("r.example", config_dir)
    message = str(caught.value)
    assert problem in message
    assert str(path) in message
    assert SECRET not in message
    assert "\n" not in message


def test_invalid_utf8_config(config_dir: Path) -> None:
    (config_dir / "config.json").write_bytes(b'{"auths": "\xff"}')
    with pytest.raises(RegistryError, match="not valid JSON"):
        lookup_credentials("r.example", config_dir)


# --- credential helpers ------------------------------------------------------------------------


def test_cred_helper_wins_over_store_and_auths(
    config_dir: Path, make_helper: Callable[[str], HelperProgram]
) -> None:
    helper = make_helper("test")
    store = make_helper("store")
    helper.store("registry.example.com:5000", "from-helper", SECRET)
    store.store("registry.example.com:5000", "from-store", SECRET)
    write_config(
        config_dir,
        {
            "credHelpers": {"registry.example.com:5000": "test"},
            "credsStore": "store",
            "auths": {"registry.example.com:5000": {"auth": basic_auth("from-file", SECRET)}},
        },
    )
    found = lookup_credentials("registry.example.com:5000", config_dir)
    assert found == Credentials("from-helper", SECRET)
    assert helper.calls() == [{"argv": ["get"], "stdin": "registry.example.com:5000"}]
    assert store.calls() == []


def test_cred_helpers_key_may_be_a_url(
    config_dir: Path, make_helper: Callable[[str], HelperProgram]
) -> None:
    helper = make_helper("test")
    helper.store("registry.example.com", "from-helper", SECRET)
    write_config(config_dir, {"credHelpers": {"https://registry.example.com/v2/": "test"}})
    found = lookup_credentials("registry.example.com", config_dir)
    assert found == Credentials("from-helper", SECRET)


@pytest.mark.parametrize("registry", HUB_NAMES)
@pytest.mark.parametrize("helper_key", [DOCKER_HUB_AUTH_KEY, *HUB_NAMES])
def test_docker_hub_helper_is_asked_for_the_v1_url(
    config_dir: Path, make_helper: Callable[[str], HelperProgram], registry: str, helper_key: str
) -> None:
    helper = make_helper("test")
    helper.store(DOCKER_HUB_AUTH_KEY, "hubuser", SECRET)
    write_config(config_dir, {"credHelpers": {helper_key: "test"}})
    assert lookup_credentials(registry, config_dir) == Credentials("hubuser", SECRET)
    assert helper.calls() == [{"argv": ["get"], "stdin": DOCKER_HUB_AUTH_KEY}]


def test_creds_store_serves_every_registry(
    config_dir: Path, make_helper: Callable[[str], HelperProgram]
) -> None:
    store = make_helper("test")
    store.store("r.example", "stored", SECRET)
    write_config(
        config_dir,
        {"credsStore": "test", "auths": {"r.example": {"auth": basic_auth("from-file", "x")}}},
    )
    assert lookup_credentials("r.example", config_dir) == Credentials("stored", SECRET)


def test_creds_store_without_an_entry_falls_back_to_auths(
    config_dir: Path, make_helper: Callable[[str], HelperProgram]
) -> None:
    store = make_helper("test")
    write_config(
        config_dir,
        {"credsStore": "test", "auths": {"r.example": {"auth": basic_auth("from-file", SECRET)}}},
    )
    assert lookup_credentials("r.example", config_dir) == Credentials("from-file", SECRET)
    assert store.calls() == [{"argv": ["get"], "stdin": "r.example"}]


def test_creds_store_without_an_entry_and_empty_auths_entry(
    config_dir: Path, make_helper: Callable[[str], HelperProgram]
) -> None:
    make_helper("test")
    write_config(config_dir, {"credsStore": "test", "auths": {"r.example": {}}})
    assert lookup_credentials("r.example", config_dir) is None


def test_cred_helper_without_an_entry_falls_back_to_auths_not_the_store(
    config_dir: Path, make_helper: Callable[[str], HelperProgram]
) -> None:
    make_helper("test")
    write_config(
        config_dir,
        {
            "credHelpers": {"r.example": "test"},
            # Not on PATH: asking it would raise.
            "credsStore": "not-installed",
            "auths": {"r.example": {"auth": basic_auth("from-file", SECRET)}},
        },
    )
    assert lookup_credentials("r.example", config_dir) == Credentials("from-file", SECRET)


def test_helper_identity_token(
    config_dir: Path, make_helper: Callable[[str], HelperProgram]
) -> None:
    make_helper("test").store("r.example", "<token>", SECRET)
    write_config(config_dir, {"credsStore": "test"})
    assert lookup_credentials("r.example", config_dir) == Credentials("", "", identity_token=SECRET)


def test_helper_answer_without_secret_means_none(
    config_dir: Path, make_helper: Callable[[str], HelperProgram]
) -> None:
    make_helper("test").store("r.example", "", "")
    write_config(config_dir, {"credsStore": "test"})
    assert lookup_credentials("r.example", config_dir) is None


def test_helper_not_found_with_other_wording(
    config_dir: Path, make_helper: Callable[[str], HelperProgram]
) -> None:
    make_helper("test").answer("r.example", "Credentials not found\n", exit_status=1)
    write_config(config_dir, {"credsStore": "test"})
    assert lookup_credentials("r.example", config_dir) is None


def test_helper_not_on_path_is_named(config_dir: Path) -> None:
    path = write_config(config_dir, {"credHelpers": {"r.example": "nothere"}})
    with pytest.raises(RegistryError) as caught:
        lookup_credentials("r.example", config_dir)
    assert "'docker-credential-nothere'" in str(caught.value)
    assert "not on PATH" in str(caught.value)
    assert str(path) in str(caught.value)


def test_store_not_on_path_is_named(config_dir: Path) -> None:
    write_config(config_dir, {"credsStore": "desktop-missing"})
    with pytest.raises(RegistryError, match="'docker-credential-desktop-missing'"):
        lookup_credentials("r.example", config_dir)


@pytest.mark.parametrize("name", ["../../bin/sh", "a/b", "-x", " "])
def test_helper_name_cannot_be_a_path(config_dir: Path, name: str) -> None:
    write_config(config_dir, {"credHelpers": {"r.example": name}})
    with pytest.raises(RegistryError, match="invalid credential helper name"):
        lookup_credentials("r.example", config_dir)


def test_empty_helper_name_means_the_file_not_the_store(config_dir: Path) -> None:
    write_config(
        config_dir,
        {
            "credHelpers": {"r.example": ""},
            "credsStore": "not-installed",
            "auths": {"r.example": {"auth": basic_auth("from-file", SECRET)}},
        },
    )
    assert lookup_credentials("r.example", config_dir) == Credentials("from-file", SECRET)


def test_helper_failure_is_a_one_line_error(
    config_dir: Path, make_helper: Callable[[str], HelperProgram]
) -> None:
    make_helper("test").answer(
        "r.example", "error talking to the keychain\nsecond line\n", exit_status=3
    )
    write_config(config_dir, {"credsStore": "test"})
    with pytest.raises(RegistryError) as caught:
        lookup_credentials("r.example", config_dir)
    message = str(caught.value)
    assert message == (
        "credential helper 'docker-credential-test' failed for r.example "
        "(exit status 3): error talking to the keychain"
    )


@pytest.mark.parametrize(
    "stdout",
    [
        '{"Username": "alice", "Secret": "' + SECRET,
        json.dumps(["alice", SECRET]),
        json.dumps({"Username": 7, "Secret": SECRET}),
        json.dumps({"Username": "alice", "Secret": [SECRET]}),
        SECRET,
    ],
)
def test_malformed_helper_answer_never_shows_the_secret(
    config_dir: Path, make_helper: Callable[[str], HelperProgram], stdout: str
) -> None:
    make_helper("test").answer("r.example", stdout)
    write_config(config_dir, {"credsStore": "test"})
    with pytest.raises(RegistryError) as caught:
        lookup_credentials("r.example", config_dir)
    assert "malformed answer" in str(caught.value)
    assert SECRET not in str(caught.value)
    # Nothing chained that a traceback would print, either.
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None or caught.value.__suppress_context__


def test_helper_is_not_run_for_a_registry_it_does_not_serve(
    config_dir: Path, make_helper: Callable[[str], HelperProgram]
) -> None:
    helper = make_helper("test")
    write_config(
        config_dir,
        {
            "credHelpers": {"other.example": "test"},
            "auths": {"r.example": {"auth": basic_auth("from-file", SECRET)}},
        },
    )
    assert lookup_credentials("r.example", config_dir) == Credentials("from-file", SECRET)
    assert helper.calls() == []


# --- the value itself ----------------------------------------------------------------------------


def test_repr_never_shows_secrets() -> None:
    credentials = Credentials("alice", SECRET, identity_token=SECRET + "-token")
    assert "alice" in repr(credentials)
    assert SECRET not in repr(credentials)
    assert SECRET not in str(credentials)


def test_credentials_are_immutable() -> None:
    credentials = Credentials("alice", SECRET)
    with pytest.raises(AttributeError):
        credentials.username = "mallory"  # type: ignore[misc]
