"""A private CA and the broker's TLS certificate: ``python -m cloud ca`` (or ``python -m cloud.ca``).

    python -m cloud.ca --dir deploy/certs --host mqtt.example.com --host mosquitto --ip 127.0.0.1

writes into ``--dir``:

* ``ca.key`` (0600) / ``ca.crt`` -- the CA (EC P-256, 10 years). Created once; kept on later runs, so devices
  that trust ``ca.crt`` keep working when the broker certificate is renewed. Keep ``ca.key`` offline.
* ``server.key`` (0600) / ``server.crt`` -- the broker certificate (EC P-256, ``--days``, default 825), signed by
  the CA, with every ``--host`` / ``--ip`` as subjectAltName and ``serverAuth`` usage. Re-created on every run
  (renewal); ``--keep-server`` keeps an existing one.
* ``ca.der`` -- the CA in DER form (smaller on a microcontroller's flash; the firmware accepts PEM or DER).

It uses the ``cryptography`` package when it is importable, else the ``openssl`` command line tool; the result
is the same. The equivalent openssl steps (documented in deploy/README.md)::

    openssl ecparam -name prime256v1 -genkey -noout -out ca.key
    openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=IoT platform CA" \\
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign -out ca.crt
    openssl ecparam -name prime256v1 -genkey -noout -out server.key
    openssl req -new -key server.key -subj "/CN=<host>" -out server.csr
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 825 \\
        -extfile ext.cnf -out server.crt    # ext.cnf: subjectAltName, keyUsage, extendedKeyUsage=serverAuth
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

CA_DAYS = 3650
SERVER_DAYS = 825


@dataclass
class CAFiles:
    dir: Path

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def ca_crt(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_der(self) -> Path:
        return self.dir / "ca.der"

    @property
    def server_key(self) -> Path:
        return self.dir / "server.key"

    @property
    def server_crt(self) -> Path:
        return self.dir / "server.crt"


def _have_cryptography() -> bool:
    try:
        import cryptography  # noqa: F401
        return True
    except ImportError:
        return False


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


# --- cryptography --------------------------------------------------------------------------------------------

def _crypto_ca(files: CAFiles, cn: str, days: int) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write_private(files.ca_key, key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    files.ca_crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _crypto_server(files: CAFiles, hosts: Sequence[str], ips: Sequence[str], days: int) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(files.ca_crt.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    sans = [x509.DNSName(h) for h in hosts] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (list(hosts) + list(ips))[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_private(files.server_key, key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    files.server_crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + files.ca_crt.read_bytes())


# --- openssl CLI ---------------------------------------------------------------------------------------------

def _openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if not exe:
        raise SystemExit("ca: neither the Python package 'cryptography' nor the 'openssl' command is available")
    result = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")


def _openssl_ca(files: CAFiles, cn: str, days: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "ca.key"
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key), cwd=files.dir)
        _openssl("req", "-x509", "-new", "-key", str(key), "-sha256", "-days", str(days), "-subj", f"/CN={cn}",
                 "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                 "-addext", "subjectKeyIdentifier=hash", "-out", str(files.ca_crt), cwd=files.dir)
        _write_private(files.ca_key, key.read_bytes())


def _openssl_server(files: CAFiles, hosts: Sequence[str], ips: Sequence[str], days: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        san = ",".join([f"DNS:{h}" for h in hosts] + [f"IP:{i}" for i in ips])
        (t / "ext.cnf").write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyAgreement\n"
            "extendedKeyUsage=serverAuth\n"
            f"subjectAltName={san}\n"
            "authorityKeyIdentifier=keyid\n")
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(t / "server.key"), cwd=t)
        cn = (list(hosts) + list(ips))[0]
        _openssl("req", "-new", "-key", str(t / "server.key"), "-subj", f"/CN={cn}", "-out", str(t / "server.csr"),
                 cwd=t)
        _openssl("x509", "-req", "-in", str(t / "server.csr"), "-CA", str(files.ca_crt), "-CAkey",
                 str(files.ca_key), "-set_serial", str(int.from_bytes(os.urandom(16), "big") >> 1), "-sha256",
                 "-days", str(days), "-extfile", str(t / "ext.cnf"), "-out", str(t / "server.crt"), cwd=t)
        _write_private(files.server_key, (t / "server.key").read_bytes())
        files.server_crt.write_bytes((t / "server.crt").read_bytes() + files.ca_crt.read_bytes())


def _der(pem: bytes) -> bytes:
    import base64

    text = pem.decode()
    body = text.split("-----BEGIN CERTIFICATE-----", 1)[1].split("-----END CERTIFICATE-----", 1)[0]
    return base64.b64decode("".join(body.split()))


# --- API -----------------------------------------------------------------------------------------------------

def make_ca(directory: str | os.PathLike, hosts: Sequence[str] = ("localhost",), ips: Sequence[str] = ("127.0.0.1",),
            *, cn: str = "IoT platform CA", ca_days: int = CA_DAYS, server_days: int = SERVER_DAYS,
            keep_server: bool = False, backend: str | None = None) -> CAFiles:
    """Create the CA (if missing) and the broker certificate under ``directory``; returns the paths.
    ``backend``: "cryptography", "openssl" or None (cryptography when importable)."""
    if not hosts and not ips:
        raise ValueError("at least one --host or --ip is needed for the broker certificate")
    for ip in ips:
        ipaddress.ip_address(ip)  # ValueError on a bad address
    files = CAFiles(Path(directory))
    files.dir.mkdir(parents=True, exist_ok=True)
    use_crypto = (backend == "cryptography") or (backend is None and _have_cryptography())
    if not (files.ca_key.exists() and files.ca_crt.exists()):
        (_crypto_ca if use_crypto else _openssl_ca)(files, cn, ca_days)
    if not (keep_server and files.server_key.exists() and files.server_crt.exists()):
        (_crypto_server if use_crypto else _openssl_server)(files, list(hosts), list(ips), server_days)
    files.ca_der.write_bytes(_der(files.ca_crt.read_bytes()))
    return files


def build_parser(prog: str = "python -m cloud ca") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="create a private CA and the MQTT broker's TLS "
                                                            "certificate (kept CA, renewed server certificate)")
    parser.add_argument("--dir", default="deploy/certs", help="output directory (default deploy/certs)")
    parser.add_argument("--host", action="append", default=None,
                        help="DNS name of the broker as devices reach it (repeatable; default localhost, mosquitto)")
    parser.add_argument("--ip", action="append", default=None, help="IP address SAN (repeatable; default 127.0.0.1)")
    parser.add_argument("--cn", default="IoT platform CA", help="the CA's common name")
    parser.add_argument("--days", type=int, default=SERVER_DAYS, help="validity of the broker certificate")
    parser.add_argument("--keep-server", action="store_true", help="keep an existing broker certificate")
    parser.add_argument("--backend", choices=("cryptography", "openssl"), default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    hosts = args.host if args.host is not None else ["localhost", "mosquitto"]
    ips = args.ip if args.ip is not None else ["127.0.0.1"]
    try:
        files = make_ca(args.dir, hosts, ips, cn=args.cn, server_days=args.days, keep_server=args.keep_server,
                        backend=args.backend)
    except (ValueError, RuntimeError) as exc:
        print(f"ca: {exc}", file=sys.stderr)
        return 2
    print(f"CA:     {files.ca_crt} (give this to devices; keep {files.ca_key.name} offline)")
    print(f"broker: {files.server_crt} + {files.server_key} for {', '.join(hosts + ips)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
