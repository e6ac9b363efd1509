"""Signing and verifying images in cosign's classic format (``sha256-HEX.sig``)."""

from signgate.signatures.attachments import (
    Attachment,
    AttachmentType,
    CleanOutcome,
    attachment_location,
    attachment_tree,
    clean,
)
from signgate.signatures.payload import SimpleSigningPayload, build_payload, parse_payload
from signgate.signatures.sign import SignedDigest, SignOutcome, sign_digest, sign_image, sign_images
from signgate.signatures.verify import (
    ImageVerification,
    SignatureCheck,
    check_signature,
    resolve_digest,
    verify_image,
    verify_images,
)

__all__ = [
    "Attachment",
    "AttachmentType",
    "CleanOutcome",
    "ImageVerification",
    "SignOutcome",
    "SignatureCheck",
    "SignedDigest",
    "SimpleSigningPayload",
    "attachment_location",
    "attachment_tree",
    "build_payload",
    "check_signature",
    "clean",
    "parse_payload",
    "resolve_digest",
    "sign_digest",
    "sign_image",
    "sign_images",
    "verify_image",
    "verify_images",
]
