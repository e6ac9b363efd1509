"""One error root for everything a user can hit.

The CLI catches :class:`Error` and nothing else: a user sees :meth:`Error.diagnostics`, one
line that names the problem, never a traceback. Third-party exceptions are wrapped where they
cross into signgate (``raise RegistryError(...) from e``).
"""

from __future__ import annotations


class Error(Exception):
    """Root of every signgate error."""

    exit_code: int = 1

    def diagnostics(self) -> str:
        """The one-line text shown to a person."""
        return " ".join(str(self).split()) or type(self).__name__


class UsageError(Error):
    """A command was called with arguments that cannot work together."""

    exit_code = 2


class InvalidReference(Error):
    """An image reference does not follow the docker/distribution grammar."""


class KeyMaterialError(Error):
    """A key file or key reference cannot be used."""


class WrongPassword(KeyMaterialError):
    """The password does not decrypt the encrypted private key."""


class UnsupportedKey(KeyMaterialError):
    """The key's algorithm or size is refused (weak or not supported)."""


class KMSError(KeyMaterialError):
    """A KMS, HSM or secret store refused or failed; the message names it and the key."""


class KeyFileExists(KeyMaterialError):
    """Refusing to overwrite an existing key file without --force."""


class RegistryError(Error):
    """A registry request failed; the message says which registry and what happened."""


class NotFound(RegistryError):
    """The manifest, blob, tag or repository does not exist."""


class Unauthorized(RegistryError):
    """The registry wants credentials we do not have, or refused the ones we sent."""


class Denied(RegistryError):
    """The credentials were accepted but do not allow this action."""


class RateLimited(RegistryError):
    """The registry kept answering 429 after bounded retries."""


class Unreachable(RegistryError):
    """No connection could be made to the registry."""


class TLSFailure(RegistryError):
    """The registry's TLS certificate could not be verified."""


class DigestMismatch(RegistryError):
    """Content served by the registry does not match its digest: tampering or corruption."""


class VerificationError(Error):
    """An image has no signature that verifies under the given keys and requirements."""


class PolicyError(Error):
    """The policy file cannot be used; the message names the file, line and field."""


class MalformedReview(Error):
    """An AdmissionReview is not one the webhook can answer (the server replies 400)."""
