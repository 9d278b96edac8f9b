"""https:// upstreams: certificates are verified with the system's trust store."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import StartProxy


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@asynccontextmanager
async def https_model(cert: Path, key: Path) -> AsyncIterator[str]:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"prediction": 1.0, "tls": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_https_upstream_trusted_by_the_system_store(
        start_proxy: StartProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A primary behind TLS whose certificate the trust store accepts is proxied."""
    cert, key = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the "system" store, for this test
    async with https_model(cert, key) as url, \
            start_proxy([{"name": "r", "primary": {"url": url}}]) as proxy, \
            aiohttp.ClientSession() as http:
        resp = await http.get(f"http://127.0.0.1:{proxy.port}/p")
        assert resp.status == 200
        assert (await resp.json())["tls"] is True


async def test_https_upstream_with_an_untrusted_certificate_is_refused(
        start_proxy: StartProxy, tmp_path: Path) -> None:
    """A certificate the trust store does not accept gives 502, never an unverified call."""
    cert, key = self_signed(tmp_path)
    async with https_model(cert, key) as url, \
            start_proxy([{"name": "r", "primary": {"url": url}}]) as proxy, \
            aiohttp.ClientSession() as http:
        resp = await http.get(f"http://127.0.0.1:{proxy.port}/p")
        assert resp.status == 502
        assert "certificate" in (await resp.json())["error"].lower()
