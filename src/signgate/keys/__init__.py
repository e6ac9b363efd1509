"""Keys: cosign's encrypted key files, key references by URI scheme, signers and public keys."""

from signgate.keys.model import PrivateKeySigner, PublicKey, Signer
from signgate.keys.password import PasswordSource, fixed_password, password_source
from signgate.keys.refs import load_public_key, load_public_keys, load_signer

__all__ = [
    "PasswordSource",
    "PrivateKeySigner",
    "PublicKey",
    "Signer",
    "fixed_password",
    "load_public_key",
    "load_public_keys",
    "load_signer",
    "password_source",
]
