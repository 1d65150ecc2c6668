"""Keys and certificates made up for a test: a private CA with a server
certificate for 127.0.0.1 (so Portcullis can reach HTTPS servers that trust
it through SSL_CERT_FILE), and JWT signing keys with their JWKS."""

from __future__ import annotations

import datetime
import ipaddress
import json
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) as PEM files."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("Portcullis test CA")).issuer_name(_name("Portcullis test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return (_pem(directory / "ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
            _pem(directory / "server.pem", cert.public_bytes(serialization.Encoding.PEM)),
            _pem(directory / "server-key.pem", key_pem))


class Issuer:
    """An identity provider's signing keys (RS256 and ES256) and its JWKS."""

    def __init__(self, issuer: str, audience: str):
        self.issuer, self.audience = issuer, audience
        self.keys = {"rsa-1": ("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
                     "ec-1": ("ES256", ec.generate_private_key(ec.SECP256R1()))}

    def jwks(self) -> str:
        keys = []
        for kid, (alg, key) in self.keys.items():
            algorithm = jwt.get_algorithm_by_name(alg)
            jwk = json.loads(algorithm.to_jwk(key.public_key()))
            keys.append({**jwk, "kid": kid, "alg": alg, "use": "sig"})
        return json.dumps({"keys": keys})

    def token(self, kid: str = "rsa-1", lifetime: int = 300, **claims) -> str:
        alg, key = self.keys[kid]
        now = int(datetime.datetime.now(datetime.timezone.utc).timestamp())
        body = {"iss": self.issuer, "aud": self.audience, "iat": now, "exp": now + lifetime, **claims}
        return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})
