"""Where the password of an encrypted key file comes from, asked for only when needed.

The rules are cosign's (``readPasswordFn`` in cmd/cosign/cli/generate/generate_key_pair.go,
https://github.com/sigstore/cosign/blob/main/cmd/cosign/cli/generate/generate_key_pair.go):

1. ``COSIGN_PASSWORD`` when it is set, even to the empty string;
2. otherwise, when stdin is a terminal, a prompt (twice when creating a key);
3. otherwise all of stdin, byte for byte. cosign uses ``io.ReadAll(os.Stdin)`` and strips
   nothing, so ``echo secret | cosign ...`` encrypts with ``secret\\n``; signgate does the same
   so that a key written by one tool opens in the other with the same piped input.
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable, Mapping
from typing import BinaryIO

from signgate.errors import KeyMaterialError

PASSWORD_ENV = "COSIGN_PASSWORD"

# Returns the password; called only when a key really has to be encrypted or decrypted.
PasswordSource = Callable[[], bytes]

_PROMPT = "Enter password for private key: "
_CONFIRM_PROMPT = "Enter password for private key again: "


def password_source(
    confirm: bool,
    *,
    environ: Mapping[str, str] | None = None,
    stdin: BinaryIO | None = None,
) -> PasswordSource:
    """The password as cosign finds it; asked for at most once, on first call.

    ``confirm`` asks twice on a terminal (for a new key). ``environ`` and ``stdin`` default to
    the process's own.
    """
    cached: list[bytes] = []

    def read() -> bytes:
        if not cached:
            cached.append(_read_password(confirm, environ, stdin))
        return cached[0]

    return read


def fixed_password(password: bytes) -> PasswordSource:
    """A source that always gives ``password`` (for library callers that already hold it)."""
    return lambda: password


def _read_password(
    confirm: bool, environ: Mapping[str, str] | None, stdin: BinaryIO | None
) -> bytes:
    environ = os.environ if environ is None else environ
    value = environ.get(PASSWORD_ENV)
    if value is not None:
        # fsencode undoes Python's surrogateescape decoding: the exact bytes of the variable.
        return os.fsencode(value)
    if stdin is None:
        if sys.stdin is None:
            raise KeyMaterialError(f"no password: set {PASSWORD_ENV} (there is no stdin)")
        stdin = sys.stdin.buffer
    if stdin.isatty():
        return _prompt(confirm)
    return stdin.read()


def _prompt(confirm: bool) -> bytes:
    try:
        first = getpass.getpass(_PROMPT)
        if confirm and getpass.getpass(_CONFIRM_PROMPT) != first:
            raise KeyMaterialError("passwords do not match")
    except EOFError as e:
        raise KeyMaterialError("no password entered") from e
    return first.encode()
