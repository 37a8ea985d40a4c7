"""Throwaway certificates for tests: a CA of the test's own and server certificates it signs (the openssl CLI)."""

from __future__ import annotations

import ipaddress
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

# EC P-256 keys: made in milliseconds (an RSA-2048 key takes up to a second on a loaded machine).
_NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _openssl(d: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d, timeout=60)


@dataclass(frozen=True)
class ServerCert:
    """A server's certificate and key, and the CA certificate a client must trust to accept it."""

    ca: Path
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


@dataclass(frozen=True)
class CertAuthority:
    """A CA made for one test (`ca.crt`, `ca.key` in its directory); nothing outside the test trusts it."""

    cert: Path
    key: Path

    def issue(self, d: Path, *names: str, stem: str = "srv") -> ServerCert:
        """A certificate for `names` (host names and IP addresses, all in subjectAltName) in `d/STEM.crt`."""
        d.mkdir(parents=True, exist_ok=True)
        sans = ",".join(f"IP:{n}" if _is_ip(n) else f"DNS:{n}" for n in names)
        _openssl(d, "req", *_NEW_KEY, "-keyout", f"{stem}.key", "-out", f"{stem}.csr", "-subj", f"/CN={names[0]}")
        # What a public CA's leaf carries; Python 3.13's strict verification (VERIFY_X509_STRICT) checks it.
        (d / f"{stem}.ext").write_text(f"subjectAltName={sans}\nkeyUsage=critical,digitalSignature\n"
                                       "extendedKeyUsage=serverAuth\nauthorityKeyIdentifier=keyid\n"
                                       "subjectKeyIdentifier=hash\n")
        _openssl(d, "x509", "-req", "-in", f"{stem}.csr", "-CA", str(self.cert), "-CAkey", str(self.key),
                 "-CAcreateserial", "-out", f"{stem}.crt", "-days", "2", "-extfile", f"{stem}.ext")
        return ServerCert(self.cert, d / f"{stem}.crt", d / f"{stem}.key")


def make_ca(d: Path) -> CertAuthority:
    d.mkdir(parents=True, exist_ok=True)
    _openssl(d, "req", "-x509", *_NEW_KEY, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=fleetfetch-test-ca", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return CertAuthority(d / "ca.crt", d / "ca.key")


def make_ca_and_server_cert(d: Path, *names: str) -> ServerCert:
    """A fresh CA in `d` and a server certificate it signs for `names` (default: 127.0.0.1)."""
    return make_ca(d).issue(d, *(names or ("127.0.0.1",)))


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
