"""HTTPS as production uses it: certificate verification, the CA bundle and a CONNECT proxy from the environment.

A real TLS server on 127.0.0.1 with a certificate made here, and a real CONNECT proxy; no network beyond loopback.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import select
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator, List, Tuple

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from moesiftornado_durable.errors import RetryableError
from moesiftornado_durable.kinds import EVENT
from moesiftornado_durable.sender import Sender


def self_signed(directory: Any) -> Tuple[str, str]:
    """A certificate for localhost and 127.0.0.1, and its key, as PEM files in `directory`."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = str(directory / "cert.pem"), str(directory / "key.pem")
    with open(cert_path, "wb") as out:
        out.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as out:
        out.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return cert_path, key_path


class _Moesif(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"sample_rate": 100}'
        self.send_response(201 if self.command == "POST" else 200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Moesif-Config-ETag", "etag-1")
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def tls_server(tmp_path: Any) -> Iterator[Tuple[str, str]]:
    """(base URI, CA bundle path) of an HTTPS server on loopback."""
    cert_path, key_path = self_signed(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Moesif)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://localhost:{server.server_address[1]}", cert_path
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def connect_proxy() -> Iterator[Tuple[int, List[bytes]]]:
    """(port, CONNECT request heads seen) of a CONNECT-only proxy on loopback."""
    listener = socket.create_server(("127.0.0.1", 0))
    heads: List[bytes] = []
    stop = threading.Event()

    def relay(client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                head += client.recv(4096)
            heads.append(head)
            host, port = head.split()[1].decode().rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=5) as upstream:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                while not stop.is_set():
                    readable, _, _ = select.select([client, upstream], [], [], 0.2)
                    for side in readable:
                        data = side.recv(65536)
                        if not data:
                            return
                        (upstream if side is client else client).sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=relay, args=(client,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1], heads
    stop.set()
    listener.close()


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY",
                 "no_proxy", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_https_with_the_ca_bundle_from_the_environment(tls_server: Tuple[str, str],
                                                       environment: pytest.MonkeyPatch) -> None:
    base_uri, bundle = tls_server
    environment.setenv("REQUESTS_CA_BUNDLE", bundle)
    sender = Sender(base_uri, "app", 5.0)
    assert sender.send(EVENT, [{"transaction_id": "a"}]).get("x-moesif-config-etag") == "etag-1"
    assert sender.fetch_app_config() == ({"sample_rate": 100}, "etag-1")
    sender.close()


def test_an_untrusted_certificate_is_refused(tls_server: Tuple[str, str], environment: pytest.MonkeyPatch) -> None:
    sender = Sender(tls_server[0], "app", 5.0)  # certifi's bundle: this certificate is in no such bundle
    with pytest.raises(RetryableError, match="CERTIFICATE_VERIFY_FAILED"):
        sender.send(EVENT, [{"transaction_id": "a"}])
    sender.close()


def test_https_through_a_connect_proxy_with_credentials(tls_server: Tuple[str, str],
                                                        connect_proxy: Tuple[int, List[bytes]],
                                                        environment: pytest.MonkeyPatch) -> None:
    (base_uri, bundle), (proxy_port, heads) = tls_server, connect_proxy
    environment.setenv("REQUESTS_CA_BUNDLE", bundle)
    environment.setenv("HTTPS_PROXY", f"http://user:secret@127.0.0.1:{proxy_port}")
    sender = Sender(base_uri, "app", 5.0)
    sender.send(EVENT, [{"transaction_id": "a"}])
    assert sender.fetch_app_config()[1] == "etag-1"
    assert len(heads) == 1  # one tunnel, kept alive for both requests
    assert heads[0].startswith(b"CONNECT localhost:") and b"Proxy-Authorization: Basic dXNlcjpzZWNyZXQ=" in heads[0]
    sender.close()
    environment.setenv("NO_PROXY", "localhost")
    direct = Sender(base_uri, "app", 5.0)
    direct.send(EVENT, [{"transaction_id": "b"}])
    assert len(heads) == 1  # NO_PROXY: straight to the server
    direct.close()


def test_a_kept_alive_connection_on_a_descriptor_past_1023_is_reused(tmp_path: Any) -> None:
    """A busy server process has many sockets open: the idle check must not use select() (limited to 1023)."""
    script = textwrap.dedent("""
        import resource, socket, sys
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 2048), hard), hard))
        from moesiftornado_durable.sender import Sender
        from moesiftornado_durable.kinds import EVENT
        from moesiftornado_durable.testing import Collector
        held = [socket.socket() for _ in range(1100)]
        with Collector() as collector:
            sender = Sender(collector.base_uri, "app", 5.0)
            for n in range(3):
                sender.send(EVENT, [{"transaction_id": f"t{n}"}])
            assert collector.transaction_ids() == ["t0", "t1", "t2"]
            assert len({r.headers.get("Host") for r in collector.requests}) == 1
            sender.close()
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert result.stdout.strip() == "ok", result.stderr
