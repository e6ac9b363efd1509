"""Signing and verifying images in both of cosign's formats: classic (``sha256-HEX.sig``) and
cosign 3's Sigstore bundles (OCI referrers).

Modules: :mod:`~signgate.signatures.formats`, :mod:`~signgate.signatures.payload`,
:mod:`~signgate.signatures.layout` and :mod:`~signgate.signatures.bundle` (pure wire formats),
:mod:`~signgate.signatures.store` (classic signature images in a registry),
:mod:`~signgate.signatures.referrers` (bundles in a registry),
:mod:`~signgate.signatures.sign`, :mod:`~signgate.signatures.verify` and
:mod:`~signgate.signatures.attachments` (clean, tree). Nothing is imported here, so that a
command loads only the modules it uses; the top-level :mod:`signgate` package exports the API.
"""
