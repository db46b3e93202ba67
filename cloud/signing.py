"""The publisher's half of update signatures: Ed25519 key pairs (`tierlite keygen`), the private
key, signing a document or a bundle's manifest. Nodes verify with tierlite.update.signing."""
from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

from tierlite.bundle import MANIFEST, Bundle
from tierlite.errors import ConfigError
from tierlite.update.signing import SIG_ALG, canonical_json, key_id

__all__ = ["generate_keypair", "load_private_key", "sign_bundle", "sign_document"]


def generate_keypair(private_path: str | Path, public_path: str | Path | None = None,
                     force: bool = False) -> tuple[Path, Path, str]:
    """Write a new Ed25519 key pair: private key PEM (mode 0600, never group/world readable at any
    moment) and public key PEM (0644). Returns (private, public, key id)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path = Path(private_path)
    public_path = Path(public_path) if public_path else private_path.with_suffix(".pub")
    for p in (private_path, public_path):
        if p.exists() and not force:
            raise ConfigError(f"{p} exists; pass --force to replace it (nodes trusting the old key will refuse new updates)")
    private_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = private_path.with_name(private_path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is masked by umask; also fixes a stale tmp file
        os.write(fd, pem)
    finally:
        os.close(fd)
    os.replace(tmp, private_path)
    pub = key.public_key()
    public_path.write_bytes(pub.public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    os.chmod(public_path, 0o644)
    return private_path, public_path, key_id(pub)



def load_private_key(path: str | Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read signing key {path}: {e.strerror}") from None
    if mode & 0o077:
        raise ConfigError(f"signing key {path} is accessible by group/others (mode {stat.S_IMODE(mode):04o}); "
                          f"run: chmod 600 {path}")
    password = os.environ.get("TIERLITE_KEY_PASSPHRASE")
    try:
        key = serialization.load_pem_private_key(data, password.encode() if password else None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path} is not a usable PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is a {type(key).__name__}, not an Ed25519 key")
    return key



def sign_document(doc: dict[str, Any], private_key) -> dict[str, Any]:
    """A copy of doc with an Ed25519 "signature" entry over canonical_json(doc)."""
    signed = {k: v for k, v in doc.items() if k != "signature"}
    signed["signature"] = {"alg": SIG_ALG, "key_id": key_id(private_key.public_key()),
                           "value": base64.b64encode(private_key.sign(canonical_json(signed))).decode()}
    return signed



def sign_bundle(bundle_dir: str | Path, private_key) -> dict[str, Any]:
    """Sign a bundle directory's manifest in place (after checking its files); returns the manifest."""
    bundle = Bundle.load(bundle_dir)
    signed = sign_document(bundle.manifest, private_key)
    tmp = bundle.root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(signed, indent=2) + "\n")
    os.replace(tmp, bundle.root / MANIFEST)
    return signed
