"""TLS for Prism's gRPC links: server credentials (TLS, or mutual TLS when a CA is given),
client credentials for a stage dialling its peers, and throwaway certificates for local use.

A deployment has one CA. Each process presents its certificate (as server, and as client to its
peers); with ``tls_ca`` set a server accepts only clients with a certificate from that CA, so
stage services are never reachable without one. Peers dial each other by IP, so a client checks
the server's certificate against one name, ``tls_server_name`` (default ``prism``), that every
certificate of the deployment carries as a subject alternative name.
"""
from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

__all__ = ["CertPaths", "ClientTls", "make_certs", "peer_tls", "server_credentials", "sync_channel"]


def _read(path: Path | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None


def server_credentials(cfg: Any) -> grpc.ServerCredentials | None:
    """From a `ServerConfig`: None (plain text) without ``tls_cert``; TLS with it; mutual TLS
    (client certificates from ``tls_ca`` required) when ``tls_ca`` is set too."""
    if cfg.tls_cert is None:
        return None
    ca = _read(cfg.tls_ca)
    return grpc.ssl_server_credentials([(_read(cfg.tls_key), _read(cfg.tls_cert))], root_certificates=ca,
                                       require_client_auth=ca is not None)


@dataclass(frozen=True)
class ClientTls:
    """How to dial a Prism server over TLS: the CA to trust (None: the system's), and a
    certificate of the deployment where the server wants one (mutual TLS), the server checked
    under `server_name`. A stage dialling its peers uses its own (`peer_tls`); tools (health
    probes, the launcher) take theirs from PRISM_TLS_CA, PRISM_TLS_CERT, PRISM_TLS_KEY and
    PRISM_TLS_SERVER_NAME."""

    ca: Path | None
    cert: Path | None = None
    key: Path | None = None
    server_name: str = "prism"

    @classmethod
    def from_env(cls, environ: Any = None) -> "ClientTls | None":
        import os

        env = os.environ if environ is None else environ
        if not env.get("PRISM_TLS_CA"):
            return None
        cert, key = env.get("PRISM_TLS_CERT"), env.get("PRISM_TLS_KEY")
        return cls(Path(env["PRISM_TLS_CA"]), Path(cert) if cert else None, Path(key) if key else None,
                   env.get("PRISM_TLS_SERVER_NAME") or "prism")

    def env(self) -> dict[str, str]:
        out = {"PRISM_TLS_SERVER_NAME": self.server_name} | ({"PRISM_TLS_CA": str(self.ca)} if self.ca else {})
        if self.cert is not None and self.key is not None:
            out |= {"PRISM_TLS_CERT": str(self.cert), "PRISM_TLS_KEY": str(self.key)}
        return out

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=_read(self.ca), private_key=_read(self.key),
                                            certificate_chain=_read(self.cert))

    def options(self) -> tuple[tuple[str, Any], ...]:
        return (("grpc.ssl_target_name_override", self.server_name),)


def peer_tls(cfg: Any) -> ClientTls | None:
    """How a process dials its peers, from its `ServerConfig`: with its own certificate, the
    peer checked against ``tls_ca`` under ``tls_server_name``; None in plain text."""
    if cfg.tls_cert is None:
        return None
    return ClientTls(cfg.tls_ca, cfg.tls_cert, cfg.tls_key, cfg.tls_server_name)


def sync_channel(address: str, tls: ClientTls | None = None) -> grpc.Channel:
    """A blocking channel to `address`: plain text, or TLS as `tls` says."""
    if tls is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, tls.credentials(), options=tls.options())


@dataclass(frozen=True)
class CertPaths:
    """What `make_certs` wrote: the CA's certificate, and one key pair for every process."""

    ca: Path
    cert: Path
    key: Path


def make_certs(directory: Path, *, names: tuple[str, ...] = ("prism", "localhost"),
               ips: tuple[str, ...] = ("127.0.0.1", "::1"), days: int = 7, ca_name: str = "Prism throwaway CA") -> CertPaths:
    """A throwaway CA and one certificate it signed (server and client use, for `names` and
    `ips`), as PEM files in `directory` (the key readable by the owner only). For local use:
    `prism up --tls` and tests; deployments mount certificates of their own."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_subject).issuer_name(ca_subject)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False),
                              critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = CertPaths(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    paths.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.touch(mode=0o600)
    paths.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return paths
