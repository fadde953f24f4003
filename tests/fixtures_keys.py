"""A service account key generated for the test (a real RSA key, never a real account's): its JSON text, as a
RunPod secret would hold it, and the private key to verify signatures with."""

from __future__ import annotations

import json

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def service_account_key(project: str) -> tuple[str, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    info = {
        "type": "service_account",
        "project_id": project,
        "private_key_id": "0123456789abcdef",
        "private_key": pem,
        "client_email": f"firegen-worker@{project}.iam.gserviceaccount.com",
        "client_id": "100000000000000000001",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    return json.dumps(info), key


def pem_body(key_json: str) -> str:
    """A line from the middle of the key's PEM: what must never show up anywhere."""
    lines = json.loads(key_json)["private_key"].splitlines()
    return lines[len(lines) // 2]
