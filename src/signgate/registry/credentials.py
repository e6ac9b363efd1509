"""Registry credentials from the docker config file, as ``docker login`` leaves them.

Where they are looked for, in order:
``credHelpers[registry]`` (a ``docker-credential-NAME`` program), then ``credsStore`` (the same
kind of program, for every registry), then the ``auths`` section of the file itself. A helper
that knows nothing of the registry passes the question on to ``auths``.

File format: https://docs.docker.com/reference/cli/docker/login/#credential-stores
Helper protocol: https://github.com/docker/docker-credential-helpers#development
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from signgate.errors import RegistryError

CONFIG_FILE_NAME = "config.json"
# Docker Hub's credentials live under the URL of its long-gone v1 index, for every client.
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
DOCKER_HUB_HOSTS = ("index.docker.io", "docker.io", "registry-1.docker.io")
HELPER_PROGRAM_PREFIX = "docker-credential-"
HELPER_TIMEOUT_SECONDS = 60.0
# A helper's answer carrying a refresh token for the registry's OAuth2 endpoint, not a password.
IDENTITY_TOKEN_USERNAME = "<token>"
# Helpers say this (exit status 1) when they hold nothing for the server URL; see
# https://github.com/docker/docker-credential-helpers/blob/master/credentials/error.go
CREDENTIALS_NOT_FOUND = "credentials not found"

_HELPER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class Credentials:
    """What to authenticate to a registry with; the secrets never show in ``repr``.

    ``identity_token`` is an OAuth2 refresh token (``identitytoken`` in the file, or a helper's
    ``<token>`` username); with one, ``username`` and ``password`` may be empty.
    """

    username: str
    password: str = field(repr=False)
    identity_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class _RegistryKeys:
    """The names a registry may be stored under: exact keys first, then any key with a host."""

    server_url: str
    exact_keys: tuple[str, ...]
    hosts: frozenset[str]


def docker_config_path(config_dir: Path | None = None) -> Path | None:
    """``config_dir/config.json``, else ``$DOCKER_CONFIG/config.json``, else
    ``~/.docker/config.json``; None when there is no home directory to look in."""
    if config_dir is None:
        from_environment = os.environ.get("DOCKER_CONFIG")
        if from_environment:
            config_dir = Path(from_environment)
        else:
            try:
                config_dir = Path.home() / ".docker"
            except RuntimeError:
                return None
    return config_dir / CONFIG_FILE_NAME


def lookup_credentials(registry: str, config_dir: Path | None = None) -> Credentials | None:
    """Credentials for ``registry`` (host[:port], as in :class:`signgate.reference.Repository`)
    from the docker config, or None when there are none (no file, no entry: go anonymous).

    Raise :class:`RegistryError` when the config is malformed or a credential helper is missing
    or fails; the message never contains a secret.
    """
    path = docker_config_path(config_dir)
    if path is None:
        return None
    config = _read_config(path)
    if config is None:
        return None
    keys = _registry_keys(registry)
    helpers = _mapping_field(config, "credHelpers", path)
    helper_entry = _find_entry(helpers, keys)
    store = config.get("credsStore")
    if store is not None and not isinstance(store, str):
        raise RegistryError(f"docker config {path}: 'credsStore' is not a string")
    if helper_entry is not None:
        helper_key, helper_name = helper_entry
        if not isinstance(helper_name, str):
            raise RegistryError(
                f"docker config {path}: credHelpers[{helper_key!r}] is not a string"
            )
        # An empty helper name means "this registry's credentials are in the file", as in docker.
        found = _ask_helper(helper_name, keys.server_url, path) if helper_name else None
        if found is not None:
            return found
    elif store:
        found = _ask_helper(store, keys.server_url, path)
        if found is not None:
            return found
    auth_entry = _find_entry(_mapping_field(config, "auths", path), keys)
    if auth_entry is None:
        return None
    return _credentials_from_auth_entry(*auth_entry, path)


def _read_config(path: Path) -> Mapping[str, Any] | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data.strip():
        return None
    try:
        config = json.loads(data)
    except json.JSONDecodeError as e:
        # `from None`: the decoder error carries the whole document, secrets included.
        raise RegistryError(
            f"docker config {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except UnicodeDecodeError:
        raise RegistryError(f"docker config {path} is not valid JSON: not UTF-8") from None
    if not isinstance(config, dict):
        raise RegistryError(f"docker config {path} is not a JSON object")
    return config


def _mapping_field(config: Mapping[str, Any], name: str, path: Path) -> Mapping[str, Any]:
    value = config.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RegistryError(f"docker config {path}: {name!r} is not a JSON object")
    return value


def _host_of(key: str) -> str:
    """The host[:port] in a config key, which may be a bare host or a URL with a path."""
    without_scheme = _SCHEME_RE.sub("", key.strip(), count=1)
    return without_scheme.split("/", 1)[0].lower()


def _registry_keys(registry: str) -> _RegistryKeys:
    host = _host_of(registry)
    if host in DOCKER_HUB_HOSTS:
        return _RegistryKeys(
            server_url=DOCKER_HUB_AUTH_KEY,
            exact_keys=(DOCKER_HUB_AUTH_KEY, *DOCKER_HUB_HOSTS),
            hosts=frozenset(DOCKER_HUB_HOSTS),
        )
    return _RegistryKeys(server_url=host, exact_keys=(host,), hosts=frozenset({host}))


def _find_entry(section: Mapping[str, Any], keys: _RegistryKeys) -> tuple[str, Any] | None:
    for key in keys.exact_keys:
        if key in section:
            return key, section[key]
    for key, value in section.items():
        if _host_of(key) in keys.hosts:
            return key, value
    return None


def _credentials_from_auth_entry(key: str, entry: Any, path: Path) -> Credentials | None:
    where = f"docker config {path}: auths[{key!r}]"
    if not isinstance(entry, dict):
        raise RegistryError(f"{where} is not a JSON object")
    fields: dict[str, str] = {}
    for name in ("auth", "username", "password", "identitytoken"):
        value = entry.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise RegistryError(f"{where}: {name!r} is not a string")
        fields[name] = value
    username = fields.get("username", "")
    password = fields.get("password", "")
    if fields.get("auth"):
        username, password = _decode_auth(fields["auth"], where)
    identity_token = fields.get("identitytoken") or None
    if not (username or password or identity_token):
        # An empty entry is what `docker login` leaves beside a credsStore: no credentials here.
        return None
    return Credentials(username, password, identity_token)


def _decode_auth(auth: str, where: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(auth, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise RegistryError(f"{where}: 'auth' is not base64 of user:password") from None
    username, colon, password = decoded.partition(":")
    if not colon:
        raise RegistryError(f"{where}: 'auth' is not base64 of user:password")
    # docker trims NUL padding that some tools leave after the password:
    # https://github.com/docker/cli/blob/master/cli/config/configfile/file.go (decodeAuth)
    return username, password.strip("\x00")


def _ask_helper(name: str, server_url: str, config_path: Path) -> Credentials | None:
    """Run ``docker-credential-NAME get``; None when it holds nothing for ``server_url``."""
    if not _HELPER_NAME_RE.fullmatch(name):
        raise RegistryError(f"docker config {config_path}: invalid credential helper name {name!r}")
    program = HELPER_PROGRAM_PREFIX + name
    executable = shutil.which(program)
    if executable is None:
        raise RegistryError(
            f"credential helper {program!r} named in docker config {config_path} is not on PATH"
        )
    try:
        completed = subprocess.run(
            [executable, "get"],
            input=server_url.encode(),
            capture_output=True,
            timeout=HELPER_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise RegistryError(
            f"credential helper {program!r} did not answer for {server_url} "
            f"within {HELPER_TIMEOUT_SECONDS:g} seconds"
        ) from None
    except OSError as e:
        raise RegistryError(f"cannot run credential helper {program!r}: {e.strerror}") from e
    if completed.returncode != 0:
        said = (completed.stdout or completed.stderr).decode(errors="replace").strip()
        if CREDENTIALS_NOT_FOUND in said.lower():
            return None
        first_line = said.splitlines()[0][:200] if said else "no output"
        raise RegistryError(
            f"credential helper {program!r} failed for {server_url} "
            f"(exit status {completed.returncode}): {first_line}"
        )
    return _credentials_from_helper_reply(completed.stdout, program, server_url)


def _credentials_from_helper_reply(
    stdout: bytes, program: str, server_url: str
) -> Credentials | None:
    # Nothing of the reply goes into a message: it holds the secret.
    malformed = RegistryError(
        f"credential helper {program!r} gave a malformed answer for {server_url} "
        '(want JSON {"ServerURL", "Username", "Secret"})'
    )
    try:
        reply = json.loads(stdout)
    except ValueError:
        raise malformed from None
    if not isinstance(reply, dict):
        raise malformed
    username = reply.get("Username") or ""
    secret = reply.get("Secret") or ""
    if not isinstance(username, str) or not isinstance(secret, str):
        raise malformed
    if not secret:
        return None
    if username == IDENTITY_TOKEN_USERNAME:
        return Credentials(username="", password="", identity_token=secret)
    return Credentials(username=username, password=secret)
