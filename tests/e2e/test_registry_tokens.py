"""Registry credentials against a registry that turns hostile. A token gate
written here stands in front of Debian's `docker-registry` over HTTPS, as a
registry with token authentication does (the distribution specification's
`WWW-Authenticate: Bearer realm=…` challenge), and its challenge can point
anywhere: a plain-HTTP port on loopback, an HTTPS service on another port
or host, a token service that answers without end. Portcullis must send the
credentials configured for the registry only to its own origin or to a realm
the config lists, never in clear text, and read every answer bounded.
Recorders on the other ports prove what did, or did not, reach them."""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import ssl
import threading
from pathlib import Path

import pytest

from pki import tls_files
from test_registry import READ_ONLY, Registry, portcullis, push
from test_serve import free_port

USER, SECRET = "team", "s3cret"
TOKEN = "token-for-team"


class Served:
    """An HTTP(S) server on a loopback port answering with `answer(handler)`
    (status, headers, body) and recording every request's path and headers."""

    def __init__(self, answer, tls: tuple[Path, Path] | None = None, host: str = "127.0.0.1"):
        self.requests: list[tuple[str, str, dict]] = []
        self.port = free_port()
        self.origin = f"{'https' if tls else 'http'}://{host}:{self.port}"
        served = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *_):
                pass

            def handle_one(self):
                served.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
                status, headers, body = answer(self)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    try:
                        self.wfile.write(body)
                    except (ConnectionError, ssl.SSLError):
                        pass  # the client stopped reading (as it must, past its bound)

            do_GET = do_HEAD = do_POST = handle_one

        self.server = http.server.ThreadingHTTPServer((host, self.port), Handler)
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def authorizations(self) -> list[str]:
        return [headers["authorization"] for _, _, headers in self.requests if "authorization" in headers]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def token_service(tokens: int = 1):
    """A token service granting TOKEN to USER:SECRET; `tokens` bytes of padding make its answer that long."""
    expected = "Basic " + base64.b64encode(f"{USER}:{SECRET}".encode()).decode()

    def answer(request):
        if request.headers.get("Authorization") != expected:
            return 401, {}, b'{"errors":[{"code":"UNAUTHORIZED"}]}'
        body = json.dumps({"token": TOKEN, "expires_in": 300, "padding": "x" * max(tokens - 60, 0)})
        return 200, {"Content-Type": "application/json"}, body.encode()
    return answer


def gate(upstream: Registry, realm: str, blobs: Served | None = None):
    """The registry's front: `/v2/` challenges with `realm` until it gets
    TOKEN; with TOKEN, requests go on to `upstream` (or, for blobs, to a
    redirect to `blobs`, as registries on object storage answer)."""

    def answer(request):
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            challenge = f'Bearer realm="{realm}",service="gate",scope="repository:team/read-only:pull"'
            return 401, {"WWW-Authenticate": challenge}, b'{"errors":[{"code":"UNAUTHORIZED"}]}'
        if blobs and "/blobs/" in request.path:
            return 307, {"Location": f"{blobs.origin}{request.path}"}, b""
        return relayed(upstream, request)
    return answer


def relayed(upstream: Registry, request) -> tuple[int, dict, bytes]:
    """`request` asked of the upstream registry (plain HTTP, anonymous)."""
    connection = http.client.HTTPConnection(upstream.host, timeout=30)
    try:
        connection.request(request.command, request.path,
                           headers={"Accept": request.headers.get("Accept", "*/*")})
        reply = connection.getresponse()
        body = reply.read()
        kept = {name: reply.headers[name] for name in ("Content-Type", "Docker-Content-Digest")
                if reply.headers[name]}
        return reply.status, kept, body
    finally:
        connection.close()


@pytest.fixture
def upstream(tmp_path: Path):
    served = Registry(tmp_path / "registry")
    yield served
    served.stop()


@pytest.fixture
def tls(tmp_path: Path):
    ca, certificate, key = tls_files(tmp_path)
    return ca, (certificate, key)


def pull_through(tmp_path: Path, front: Served, ca: Path, realms: list[str] = ()):
    """`portcullis policy pull` of team/read-only:1 from `front`, with USER:SECRET configured for it."""
    host = f"127.0.0.1:{front.port}"
    (tmp_path / "registry.pass").write_text(SECRET + "\n")
    config = tmp_path / "registries.toml"
    config.write_text(f'[policy_sources]\ncache_dir = "{tmp_path / "cache"}"\n'
                      f'[registries."{host}"]\nusername = "{USER}"\npassword = "${{file:registry.pass}}"\n'
                      f'token_realms = {json.dumps(list(realms))}\n')
    return portcullis("policy", "pull", f"oci://{host}/team/read-only:1", "--config", str(config), check=False,
                      env={"SSL_CERT_FILE": str(ca), "DOCKER_CONFIG": str(tmp_path / "none")})


def pushed(upstream: Registry) -> str:
    return push(READ_ONLY, upstream.ref("team/read-only:1")).split("@")[1]


def test_a_challenge_pointing_at_a_plain_http_port_gets_no_credentials(tmp_path: Path, upstream: Registry, tls):
    ca, pair = tls
    pushed(upstream)
    listener = Served(token_service())
    front = Served(gate(upstream, f"{listener.origin}/token"), tls=pair)
    try:
        refused = pull_through(tmp_path, front, ca)
        assert refused.returncode != 0, refused.stdout
        assert "token_realms" in refused.stderr and str(listener.port) in refused.stderr, refused.stderr
        assert listener.requests == [], "nothing, not even an anonymous request, went to the unlisted realm"
        # Listing it does not make clear text acceptable in front of an HTTPS registry.
        listed = pull_through(tmp_path, front, ca, realms=[f"{listener.origin}/token"])
        assert listed.returncode != 0 and "plain HTTP" in listed.stderr, listed.stderr
        assert listener.requests == []
    finally:
        front.stop()
        listener.stop()


def test_a_realm_on_another_origin_is_used_only_when_the_config_lists_it(tmp_path: Path, upstream: Registry, tls):
    ca, pair = tls
    digest = pushed(upstream)
    service = Served(token_service(), tls=pair)
    front = Served(gate(upstream, f"{service.origin}/token"), tls=pair)
    elsewhere = Served(gate(upstream, f"https://127.0.0.2:{service.port}/token"), tls=pair)
    try:
        unlisted = pull_through(tmp_path, front, ca)
        assert unlisted.returncode != 0 and "token_realms" in unlisted.stderr, unlisted.stderr
        assert service.requests == []
        other_host = pull_through(tmp_path, elsewhere, ca, realms=[f"{service.origin}/token"])
        assert other_host.returncode != 0 and "127.0.0.2" in other_host.stderr, other_host.stderr
        assert service.requests == []

        listed = pull_through(tmp_path, front, ca, realms=[f"{service.origin}/token"])
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.strip() == digest
        # The token service got the password, the registry only the token it gave.
        assert service.authorizations() == ["Basic " + base64.b64encode(f"{USER}:{SECRET}".encode()).decode()]
        assert set(front.authorizations()) == {f"Bearer {TOKEN}"}
        scopes = [path for _, path, _ in service.requests]
        assert "scope=repository%3Ateam%2Fread-only%3Apull" in scopes[0] and "service=gate" in scopes[0], scopes
    finally:
        for served in (front, elsewhere, service):
            served.stop()


def test_a_blob_redirected_elsewhere_is_fetched_without_the_registrys_token(tmp_path: Path, upstream: Registry,
                                                                            tls):
    """One server is both the registry and its token service, as small
    registries are (no listing needed), and its blobs live elsewhere."""
    ca, pair = tls
    digest = pushed(upstream)
    storage = Served(lambda request: relayed(upstream, request), tls=pair)
    service = token_service()
    fronted = {}

    def both(request):
        return service(request) if request.path.startswith("/token") else fronted["gate"](request)
    combined = Served(both, tls=pair)
    fronted["gate"] = gate(upstream, f"{combined.origin}/token", blobs=storage)
    try:
        pulled = pull_through(tmp_path, combined, ca)
        assert pulled.returncode == 0, pulled.stderr
        assert pulled.stdout.strip() == digest
        assert storage.requests, "the blob was fetched from where the registry redirected"
        assert storage.authorizations() == [], "the registry's token stays with the registry"
    finally:
        combined.stop()
        storage.stop()


def test_a_token_service_answering_without_end_is_read_bounded(tmp_path: Path, upstream: Registry, tls):
    ca, pair = tls
    pushed(upstream)
    service = Served(token_service(tokens=8 << 20), tls=pair)
    front = Served(gate(upstream, f"{service.origin}/token"), tls=pair)
    try:
        refused = pull_through(tmp_path, front, ca, realms=[f"{service.origin}/token"])
        assert refused.returncode != 0, refused.stdout
        assert "longer than" in refused.stderr, refused.stderr
    finally:
        front.stop()
        service.stop()
