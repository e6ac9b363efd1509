"""Signing and verifying images in cosign's classic format (``sha256-HEX.sig``).

Modules: :mod:`~signgate.signatures.payload` and :mod:`~signgate.signatures.layout` (pure wire
formats), :mod:`~signgate.signatures.store` (signature images in a registry),
:mod:`~signgate.signatures.sign`, :mod:`~signgate.signatures.verify` and
:mod:`~signgate.signatures.attachments` (clean, tree). Nothing is imported here, so that a
command loads only the modules it uses; the top-level :mod:`signgate` package exports the API.
"""
