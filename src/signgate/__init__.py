"""signgate: sign container images in CI, admit only signed images in Kubernetes.

Compatible with cosign's key files and signature layout in both directions. The names below are
the library API behind the ``signgate`` command; they are imported on first use, so that the
command line starts fast::

    import asyncio, signgate

    async def main() -> None:
        keys = signgate.load_public_keys(["cosign.pub"])
        image = signgate.ImageReference.parse("registry.example.com/team/app:1.0")
        async with signgate.RegistryClient(signgate.RegistryOptions()) as client:
            result = await signgate.verify_image(client, image, keys)
        print(result.ok, result.digest, result.reason())

    asyncio.run(main())
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Error": "signgate.errors",
    "ImageReference": "signgate.reference",
    "ImageVerification": "signgate.signatures.verify",
    "PublicKey": "signgate.keys",
    "RegistryClient": "signgate.registry",
    "RegistryOptions": "signgate.registry",
    "Repository": "signgate.reference",
    "SignOutcome": "signgate.signatures.sign",
    "SignatureFormat": "signgate.signatures.formats",
    "SignedDigest": "signgate.signatures.sign",
    "Signer": "signgate.keys",
    "attachment_tree": "signgate.signatures.attachments",
    "build_payload": "signgate.signatures.payload",
    "clean": "signgate.signatures.attachments",
    "fixed_password": "signgate.keys",
    "generate_key_pair": "signgate.keys.files",
    "import_key_pair": "signgate.keys.files",
    "load_public_key": "signgate.keys",
    "load_public_keys": "signgate.keys",
    "load_signer": "signgate.keys",
    "password_source": "signgate.keys",
    "sign_image": "signgate.signatures.sign",
    "sign_images": "signgate.signatures.sign",
    "verify_image": "signgate.signatures.verify",
    "verify_images": "signgate.signatures.verify",
}

__all__ = [
    "Error",
    "ImageReference",
    "ImageVerification",
    "PublicKey",
    "RegistryClient",
    "RegistryOptions",
    "Repository",
    "SignOutcome",
    "SignatureFormat",
    "SignedDigest",
    "Signer",
    "attachment_tree",
    "build_payload",
    "clean",
    "fixed_password",
    "generate_key_pair",
    "import_key_pair",
    "load_public_key",
    "load_public_keys",
    "load_signer",
    "password_source",
    "sign_image",
    "sign_images",
    "verify_image",
    "verify_images",
]

if TYPE_CHECKING:
    from signgate.errors import Error
    from signgate.keys import (
        PublicKey,
        Signer,
        fixed_password,
        load_public_key,
        load_public_keys,
        load_signer,
        password_source,
    )
    from signgate.keys.files import generate_key_pair, import_key_pair
    from signgate.reference import ImageReference, Repository
    from signgate.registry import RegistryClient, RegistryOptions
    from signgate.signatures.attachments import attachment_tree, clean
    from signgate.signatures.formats import SignatureFormat
    from signgate.signatures.payload import build_payload
    from signgate.signatures.sign import SignedDigest, SignOutcome, sign_image, sign_images
    from signgate.signatures.verify import ImageVerification, verify_image, verify_images


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'signgate' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
