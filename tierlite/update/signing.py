"""Ed25519 signatures on update documents (manifests, announcements), node side: trusted public
keys and verification. The signed bytes are `canonical_json(doc)`; the publisher's half (keys,
signing) is tierlite.cloud.signing."""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from tierlite.errors import ConfigError, UpdateError

__all__ = ["SIG_ALG", "canonical_json", "key_id", "load_public_key", "verify_document"]

SIG_ALG = "ed25519"


def load_public_key(path: str | Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as e:
        raise ConfigError(f"cannot read public key {path}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"{path} is not a PEM public key: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is a {type(key).__name__}, not an Ed25519 public key")
    return key



def key_id(public_key) -> str:
    """Short fingerprint: first 16 hex digits of sha256 of the raw 32-byte public key."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]



def canonical_json(doc: dict[str, Any]) -> bytes:
    """The signed bytes: sorted keys, no spaces, ASCII; the "signature" entry left out."""
    body = {k: v for k, v in doc.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()



def verify_document(doc: dict[str, Any], trusted_keys: Iterable, what: str) -> str:
    """Check doc's signature against the trusted public keys; returns the key id that signed it."""
    from cryptography.exceptions import InvalidSignature

    sig = doc.get("signature")
    if not sig:
        raise UpdateError(f"{what} is unsigned")
    if not isinstance(sig, dict) or sig.get("alg") != SIG_ALG or not isinstance(sig.get("value"), str):
        raise UpdateError(f"{what} has a malformed signature entry (want alg {SIG_ALG!r} and a base64 value)")
    try:
        value = base64.b64decode(sig["value"], validate=True)
        body = canonical_json(doc)
    except (ValueError, TypeError) as e:
        raise UpdateError(f"{what}: signature or body not encodable: {e}") from None
    keys = {key_id(k): k for k in trusted_keys}
    claimed = str(sig.get("key_id", ""))
    # Try the claimed key first, then all (the key id is a hint, not trusted).
    for kid in sorted(keys, key=lambda k: k != claimed):
        try:
            keys[kid].verify(value, body)
            return kid
        except InvalidSignature:
            continue
    if claimed not in keys:
        raise UpdateError(f"{what} is signed by key {claimed or '?'} which this node does not trust "
                          f"(trusted: {', '.join(sorted(keys)) or 'none'})")
    raise UpdateError(f"{what}: signature does not verify (tampered or wrongly signed)")
