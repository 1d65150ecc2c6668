"""Sharing policies through a real OCI registry: Debian's `docker-registry`
(the CNCF distribution server) on loopback, the release `portcullis`
pushing, signing, verifying and pulling, gateways governing the real
filesystem server with what they pulled, and what must be refused —
unsigned modules, modules signed by another key, tampered blobs, a followed
tag moved to an unsigned module. Interoperability is checked against
clients this project did not write: PyPI's `oras` pushes and pulls the same
artifacts byte for byte, and a cosign signer and verifier written here from
the cosign specification (Python `cryptography` and PyNaCl) accept
Portcullis' keys and signatures and make ones Portcullis accepts."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import PORTCULLIS, POLICIES, proxied_filesystem, read_audit
from test_reload import outcome
from test_serve import free_port

READ_ONLY = POLICIES / "read_only.wasm"  # `{}`: refuses tools not annotated read-only
ALLOWS = POLICIES / "method_filter.wasm"  # `{}`: allows every call
PASSWORD = "correct horse battery staple"
WRITES_REFUSED = [{
    "name": "writes are refused",
    "exchange": {"method": "tools/call", "tool": "write_file", "annotations": {"readOnlyHint": False},
                 "params": {"name": "write_file", "arguments": {"path": "/x", "content": "y"}}},
    "expect": "deny",
}]


class Registry:
    """docker-registry serving a directory of its own on a loopback port;
    over TLS with a certificate of `tls` (certificate, key), and asking for
    `users` (name: password) when given."""

    def __init__(self, directory: Path, tls: tuple[Path, Path] | None = None, users: dict | None = None):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.storage = directory / "storage"
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.scheme = "https" if tls else "http"
        http = f"addr: '{self.host}'"
        if tls:
            http += f", tls: {{certificate: {tls[0]}, key: {tls[1]}}}"
        lines = ["version: 0.1", "log: {level: error}",
                 f"storage: {{filesystem: {{rootdirectory: {self.storage}}}, delete: {{enabled: true}}}}",
                 f"http: {{{http}}}"]
        if users:
            import bcrypt
            htpasswd = directory / "htpasswd"
            htpasswd.write_text("".join(
                f"{name}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
                for name, password in users.items()))
            lines.append(f"auth: {{htpasswd: {{realm: test, path: {htpasswd}}}}}")
        config = directory / "registry.yml"
        config.write_text("\n".join(lines) + "\n")
        self.process = None
        self.config = config
        self.start()

    def start(self) -> None:
        registry = shutil.which("docker-registry")
        assert registry, "Debian's docker-registry is not installed (scripts/setup installs it)"
        self.process = subprocess.Popen([registry, "serve", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        import ssl
        unverified = ssl._create_unverified_context()
        while True:
            try:
                with urllib.request.urlopen(f"{self.scheme}://{self.host}/v2/", timeout=2, context=unverified):
                    return
            except urllib.error.HTTPError as refused:
                if refused.code == 401:  # up, and asking for credentials
                    return
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "the registry did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)

    def ref(self, path: str) -> str:
        return f"oci://{self.host}/{path}"

    def get(self, path: str, accept: str = "application/vnd.oci.image.manifest.v1+json") -> bytes:
        request = urllib.request.Request(f"http://{self.host}/v2/{path}", headers={"Accept": accept})
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.read()

    def put_blob(self, repository: str, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        start = urllib.request.Request(f"http://{self.host}/v2/{repository}/blobs/uploads/", method="POST")
        with urllib.request.urlopen(start, timeout=10) as answer:
            location = answer.headers["Location"]
        if location.startswith("/"):
            location = f"http://{self.host}{location}"
        separator = "&" if "?" in location else "?"
        upload = urllib.request.Request(f"{location}{separator}digest={digest}", data=data, method="PUT",
                                        headers={"Content-Type": "application/octet-stream"})
        urllib.request.urlopen(upload, timeout=10).close()
        return digest

    def put_manifest(self, repository: str, reference: str, manifest: bytes) -> None:
        request = urllib.request.Request(
            f"http://{self.host}/v2/{repository}/manifests/{reference}", data=manifest, method="PUT",
            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        urllib.request.urlopen(request, timeout=10).close()

    def blob_file(self, digest: str) -> Path:
        hex_digits = digest.removeprefix("sha256:")
        return self.storage / "docker" / "registry" / "v2" / "blobs" / "sha256" / hex_digits[:2] / hex_digits / "data"


@pytest.fixture
def registry(tmp_path: Path):
    served = Registry(tmp_path / "registry")
    yield served
    served.stop()


def portcullis(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Runs the release binary with the key password set and a cache of the test's own."""
    result = subprocess.run([str(PORTCULLIS), *args], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PORTCULLIS_KEY_PASSWORD": PASSWORD, **(env or {})})
    if check:
        assert result.returncode == 0, f"portcullis {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def keygen(directory: Path, name: str) -> tuple[Path, Path]:
    portcullis("policy", "keygen", "--output-prefix", str(directory / name))
    return directory / f"{name}.key", directory / f"{name}.pub"


def push(module: Path, reference: str, *flags: str) -> str:
    """Pushes and returns the digest reference, the command's last line."""
    pushed = portcullis("policy", "push", str(module), reference, *flags).stdout.strip().splitlines()[-1]
    assert pushed.startswith(reference.rsplit(":", 1)[0] + "@sha256:"), pushed
    return pushed


def sign(reference: str, key: Path) -> None:
    portcullis("policy", "sign", reference, "--key", str(key))


def gateway_config(directory: Path, module: str, *, keys: list[Path] = (), follow: bool = False,
                   cache: Path | None = None, extra: str = "") -> Path:
    lines = [f'[engine]\ncache_dir = "{cache or directory / "cache"}"',
             f'[policy_sources]\nrefresh_secs = 1',
             f'[trust]\nkeys = {json.dumps([str(k) for k in keys])}',
             f'[[policy]]\nname = "gate"\nmodule = "{module}"\nmethods = ["tools/call"]',
             "follow = true" if follow else "", extra]
    config = directory / "portcullis.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def stdio_refuses(config: Path, sandbox: Path, audit: Path) -> str:
    """Starts `portcullis stdio` on `config`, which must refuse to start; its stderr."""
    from conftest import FS_SERVER
    started = subprocess.run(
        [str(PORTCULLIS), "stdio", "--config", str(config), "--audit-file", str(audit), "--", "node",
         str(FS_SERVER), str(sandbox)], input="", capture_output=True, text=True, timeout=120)
    assert started.returncode != 0, started.stderr
    return started.stderr


def test_a_pushed_signed_and_pinned_policy_governs_the_filesystem_server(tmp_path: Path, registry: Registry,
                                                                          sandbox: Path):
    private, public = keygen(tmp_path, "team")
    assert private.read_text().startswith("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----")
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    fixtures = tmp_path / "read-only.fixtures.json"
    fixtures.write_text(json.dumps(WRITES_REFUSED))
    pinned = push(READ_ONLY, registry.ref("team/read-only:1.4.0"), "--fixtures", str(fixtures))
    _, other_public = keygen(tmp_path, "other")
    assert portcullis("policy", "verify", pinned, "--key", str(public), check=False).returncode == 1
    sign(registry.ref("team/read-only:1.4.0"), private)
    verified = portcullis("policy", "verify", pinned, "--key", str(public))
    assert "is signed by team.pub" in verified.stdout
    assert portcullis("policy", "verify", pinned, "--key", str(other_public), check=False).returncode == 1

    inspected = portcullis("policy", "inspect", pinned).stdout
    assert "application/vnd.wasm.config.v0+json" in inspected
    assert "dev.portcullis.wit.world = portcullis:policy/policy@0.1.0" in inspected
    assert "dev.portcullis.wit.exports = portcullis:policy/hooks@0.1.0" in inspected
    assert "read-only.fixtures.json" in inspected and "signature " in inspected

    config = gateway_config(tmp_path, pinned, keys=[public])
    checked = portcullis("check", str(config))
    assert f"digest {pinned.split('@')[1]}  signed by team.pub" in checked.stdout, checked.stdout
    assert "WARNING: named by tag only" not in checked.stdout
    (tmp_path / "tagged").mkdir()
    tagged = gateway_config(tmp_path / "tagged", registry.ref("team/read-only:1.4.0"), keys=[public])
    assert "WARNING: named by tag only" in portcullis("check", str(tagged)).stdout

    config = gateway_config(tmp_path, pinned, keys=[public])
    audit = tmp_path / "audit.jsonl"

    async def scenario():
        async with proxied_filesystem(config, audit, sandbox) as session:
            read = await session.call_tool("read_text_file", {"path": str(sandbox / "hello.txt")})
            assert not read.is_error and "hello from the sandbox" in read.content[0].text
            assert await outcome(session, sandbox) == "denied"

    asyncio.run(scenario())
    assert not (sandbox / "made").exists()


def test_unsigned_foreign_signed_and_tampered_modules_are_refused_by_check_and_at_start(
        tmp_path: Path, registry: Registry, sandbox: Path):
    private, public = keygen(tmp_path, "team")
    stranger, _ = keygen(tmp_path, "stranger")
    unsigned = push(READ_ONLY, registry.ref("team/unsigned:1"))
    foreign = push(READ_ONLY, registry.ref("team/foreign:1"))
    sign(foreign, stranger)
    tampered = push(ALLOWS, registry.ref("team/tampered:1"))
    sign(tampered, private)
    # The registry's copy of the component is altered after signing.
    manifest = json.loads(registry.get(f"team/tampered/manifests/{tampered.split('@')[1]}"))
    layer = next(l for l in manifest["layers"] if l["mediaType"] == "application/wasm")
    blob = registry.blob_file(layer["digest"])
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))

    for name, reference, why in [("unsigned", unsigned, "it is not signed"),
                                 ("foreign", foreign, "signed by a key not in [trust]"),
                                 ("tampered", tampered, "does not match its digest")]:
        directory = tmp_path / name
        directory.mkdir()
        config = gateway_config(directory, reference, keys=[public])
        checked = portcullis("check", str(config), check=False)
        assert checked.returncode == 1 and "REFUSED" in checked.stdout and why in checked.stdout, checked.stdout
        audit = directory / "audit.jsonl"
        stderr = stdio_refuses(config, sandbox, audit)
        assert why in stderr, stderr
        refused = [r for r in read_audit(audit) if r.get("event") == "module-refused"]
        assert len(refused) == 1 and refused[0]["module"] == reference and why in refused[0]["reason"]
        assert refused[0]["digest"] == reference.split("@")[1]


def test_a_followed_tag_swaps_in_signed_versions_under_load_and_refuses_unsigned_ones(
        tmp_path: Path, registry: Registry, sandbox: Path):
    private, public = keygen(tmp_path, "team")
    tag = registry.ref("team/gate:stable")
    allows = push(ALLOWS, tag)
    sign(allows, private)
    config = gateway_config(tmp_path, tag, keys=[public], follow=True)
    audit = tmp_path / "audit.jsonl"
    seen: list[str] = []

    async def until(session, wanted: str, limit: float = 60.0) -> None:
        deadline = asyncio.get_running_loop().time() + limit
        while await outcome(session, sandbox) != wanted:
            assert asyncio.get_running_loop().time() < deadline, f"never saw '{wanted}'"
            await asyncio.sleep(0.2)

    status_dir = tmp_path / "status"

    def serving() -> str:
        shown = subprocess.run([str(PORTCULLIS), "status", "--json"], capture_output=True, text=True, check=True,
                               env={**os.environ, "PORTCULLIS_STATUS_DIR": str(status_dir)})
        [process] = json.loads(shown.stdout)
        return process["policies"][0]["source"]

    async def scenario():
        async with proxied_filesystem(config, audit, sandbox, env={"PORTCULLIS_STATUS_DIR": str(status_dir)}) \
                as session:
            assert await outcome(session, sandbox) == "allowed"
            assert serving() == f"{tag} ({allows.split('@')[1]})"
            done = asyncio.Event()

            async def hammer():
                while not done.is_set():
                    seen.append(await outcome(session, sandbox))

            background = asyncio.create_task(hammer())
            # Moved to an unsigned module: refused, the signed one keeps serving.
            push(READ_ONLY, tag)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while not [r for r in read_audit(audit) if r.get("event") == "module-refused"]:
                assert loop.time() < deadline, "the unsigned module was never refused"
                await asyncio.sleep(0.2)
            assert await outcome(session, sandbox) == "allowed"
            # The rest of the config still reloads meanwhile, on the version that serves.
            config.write_text(config.read_text() + "# edited\n")
            while not [r for r in read_audit(audit) if r.get("event") == "reload" and r["trigger"] == "file"]:
                assert loop.time() < deadline, "the edited config was never reloaded"
                await asyncio.sleep(0.2)
            assert await outcome(session, sandbox) == "allowed"
            # Moved to a signed one: swapped in.
            denies = push(READ_ONLY, tag, "--fixtures", str(fixtures_file(tmp_path)))
            sign(denies, private)
            await until(session, "denied")
            assert serving() == f"{tag} ({denies.split('@')[1]})"
            done.set()
            await background
            return allows, denies

    first, second = asyncio.run(scenario())
    assert set(seen) <= {"allowed", "denied"} and "allowed" in seen
    records = read_audit(audit)
    edited = [r for r in records if r.get("event") == "reload" and r["trigger"] == "file"]
    assert [r["result"] for r in edited] == ["ok"] and edited[0]["policies"][0]["digest"] == first.split("@")[1]
    swaps = [r for r in records if r.get("event") == "reload" and r["trigger"] == "registry"]
    assert [s["result"] for s in swaps] == ["ok"]
    policy = swaps[0]["policies"][0]
    assert policy["source"] == tag
    assert policy["previous_digest"] == first.split("@")[1] and policy["digest"] == second.split("@")[1]
    assert policy["signer"].startswith("team.pub (sha256:")
    refused = [r for r in records if r.get("event") == "module-refused"]
    assert refused and refused[0]["module"] == tag and "it is not signed" in refused[0]["reason"]
    assert refused[0]["digest"] not in (first.split("@")[1], second.split("@")[1])


def fixtures_file(directory: Path) -> Path:
    path = directory / "read-only.fixtures.json"
    path.write_text(json.dumps(WRITES_REFUSED))
    return path


def test_fixtures_that_travel_with_a_module_must_pass_before_it_serves(tmp_path: Path, registry: Registry,
                                                                       sandbox: Path):
    private, public = keygen(tmp_path, "team")
    # The fixtures promise writes are refused; this module allows every call.
    pinned = push(ALLOWS, registry.ref("team/broken:1"), "--fixtures", str(fixtures_file(tmp_path)))
    sign(pinned, private)
    config = gateway_config(tmp_path, pinned, keys=[public])
    checked = portcullis("check", str(config), check=False)
    assert checked.returncode == 1, checked.stdout
    assert "fixture 'writes are refused'" in checked.stdout and "signed by team.pub" in checked.stdout
    stderr = stdio_refuses(config, sandbox, tmp_path / "audit.jsonl")
    assert "fixture 'writes are refused'" in stderr, stderr


def test_a_digest_pinned_module_starts_from_the_cache_with_the_registry_down(tmp_path: Path,
                                                                          registry: Registry, sandbox: Path):
    private, public = keygen(tmp_path, "team")
    pinned = push(READ_ONLY, registry.ref("team/read-only:1"))
    sign(pinned, private)
    cache = tmp_path / "shared-cache"
    config = gateway_config(tmp_path, pinned, keys=[public], cache=cache)
    assert portcullis("check", str(config)).returncode == 0
    registry.stop()
    audit = tmp_path / "audit.jsonl"

    async def scenario():
        async with proxied_filesystem(config, audit, sandbox) as session:
            assert await outcome(session, sandbox) == "denied"

    asyncio.run(scenario())
    tagged_dir = tmp_path / "tagged"
    tagged_dir.mkdir()
    tagged = gateway_config(tagged_dir, registry.ref("team/read-only:1"), keys=[public], cache=cache)
    stderr = stdio_refuses(tagged, sandbox, tagged_dir / "audit.jsonl")
    assert "cannot be reached; pin a digest" in stderr, stderr
    registry.start()


def test_oras_pulls_what_portcullis_pushed_and_portcullis_pulls_what_oras_pushed(tmp_path: Path,
                                                                                  registry: Registry):
    import oras.client
    client = oras.client.OrasClient(hostname=registry.host, insecure=True)
    pinned = push(READ_ONLY, registry.ref("team/read-only:1"))
    out = tmp_path / "oras-out"
    pulled = client.pull(target=f"{registry.host}/team/read-only:1", outdir=str(out))
    assert [Path(p).name for p in pulled] == ["read_only.wasm"]
    assert Path(pulled[0]).read_bytes() == READ_ONLY.read_bytes()

    module = tmp_path / "allows.wasm"
    shutil.copyfile(ALLOWS, module)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"architecture": "wasm", "os": "wasip2"}))
    cwd = os.getcwd()
    os.chdir(tmp_path)  # oras names layers by their path
    try:
        client.push(target=f"{registry.host}/team/allows:1", files=["allows.wasm:application/wasm"],
                    manifest_config="config.json:application/vnd.wasm.config.v0+json")
    finally:
        os.chdir(cwd)
    cache = tmp_path / "cache"
    config_toml = tmp_path / "pull.toml"
    config_toml.write_text(f'[policy_sources]\ncache_dir = "{cache}"\n')
    digest = portcullis("policy", "pull", registry.ref("team/allows:1"), "--config",
                        str(config_toml)).stdout.strip().splitlines()[-1]
    assert digest.startswith("sha256:") and pinned.split("@")[1] != digest
    wasm_digest = hashlib.sha256(ALLOWS.read_bytes()).hexdigest()
    assert (cache / "blobs" / "sha256" / wasm_digest).read_bytes() == ALLOWS.read_bytes()


def test_an_https_registry_with_credentials_from_the_config_or_the_docker_config(tmp_path: Path):
    from pki import tls_files
    ca, certificate, key = tls_files(tmp_path)
    served = Registry(tmp_path / "registry", tls=(certificate, key), users={"team": "s3cret"})
    try:
        reference = served.ref("team/read-only:1")
        (tmp_path / "registry.pass").write_text("s3cret\n")
        config = tmp_path / "registries.toml"
        config.write_text(f'[policy_sources]\ncache_dir = "{tmp_path / "cache"}"\n'
                          f'[registries."{served.host}"]\nusername = "${{env:REGISTRY_USER}}"\n'
                          f'password = "${{file:registry.pass}}"\n')
        trusted = {"SSL_CERT_FILE": str(ca), "REGISTRY_USER": "team", "DOCKER_CONFIG": str(tmp_path / "none")}
        pushed = portcullis("policy", "push", str(READ_ONLY), reference, "--config", str(config), env=trusted)
        assert pushed.stdout.strip().splitlines()[-1].startswith(reference.rsplit(":", 1)[0] + "@sha256:")

        # Without the CA, the certificate is not trusted (and plain HTTP is no way round it).
        (tmp_path / "other").mkdir()
        other_ca, _, _ = tls_files(tmp_path / "other")
        untrusted = portcullis("policy", "pull", reference, "--config", str(config), check=False,
                               env={**trusted, "SSL_CERT_FILE": str(other_ca)})
        assert untrusted.returncode != 0, untrusted.stdout
        # Without credentials, the registry refuses.
        anonymous = portcullis("policy", "pull", reference, check=False,
                               env={"SSL_CERT_FILE": str(ca), "DOCKER_CONFIG": str(tmp_path / "none"),
                                    "XDG_CACHE_HOME": str(tmp_path / "xdg")})
        assert anonymous.returncode != 0 and "auth" in anonymous.stderr.lower(), anonymous.stderr
        # The Docker config file's credentials, as `docker login` leaves them.
        docker = tmp_path / "docker"
        docker.mkdir()
        (docker / "config.json").write_text(json.dumps(
            {"auths": {served.host: {"auth": base64.b64encode(b"team:s3cret").decode()}}}))
        pulled = portcullis("policy", "pull", reference,
                            env={"SSL_CERT_FILE": str(ca), "DOCKER_CONFIG": str(docker),
                                 "XDG_CACHE_HOME": str(tmp_path / "xdg")})
        assert pulled.stdout.strip() == pushed.stdout.strip().splitlines()[-1].split("@")[1]
    finally:
        served.stop()


def test_a_mirror_made_by_skopeo_runs_the_same_signed_module(tmp_path: Path, registry: Registry, sandbox: Path):
    """Air-gapped mirrors: Debian's skopeo copies the artifact and its
    signature between registries; the digest and the signature hold."""
    skopeo = shutil.which("skopeo")
    assert skopeo, "Debian's skopeo is not installed (scripts/setup installs it)"
    private, public = keygen(tmp_path, "team")
    pinned = push(READ_ONLY, registry.ref("team/read-only:1"))
    sign(pinned, private)
    digest = pinned.split("@")[1]
    mirror = Registry(tmp_path / "mirror")
    try:
        plain = ["--src-tls-verify=false", "--dest-tls-verify=false"]
        for source, target in [(f"team/read-only@{digest}", "team/read-only:1"),
                               (f"team/read-only:{digest.replace(':', '-')}.sig",
                                f"team/read-only:{digest.replace(':', '-')}.sig")]:
            copied = subprocess.run([skopeo, "copy", "--all", *plain, f"docker://{registry.host}/{source}",
                                     f"docker://{mirror.host}/{target}"], capture_output=True, text=True,
                                    timeout=120)
            assert copied.returncode == 0, copied.stderr
        registry.stop()
        mirrored = f"{mirror.ref('team/read-only')}@{digest}"
        config = gateway_config(tmp_path, mirrored, keys=[public])
        assert "signed by team.pub" in portcullis("check", str(config)).stdout

        async def scenario():
            async with proxied_filesystem(config, tmp_path / "audit.jsonl", sandbox) as session:
                assert await outcome(session, sandbox) == "denied"

        asyncio.run(scenario())
        registry.start()
    finally:
        mirror.stop()


def cosign_decrypt(private_pem: str, password: bytes) -> bytes:
    """The PKCS#8 DER inside an encrypted cosign private key, per cosign's
    format: a PEM-wrapped JSON envelope, scrypt as the KDF, NaCl secretbox."""
    import nacl.secret
    body = "".join(line for line in private_pem.splitlines() if not line.startswith("-----"))
    envelope = json.loads(base64.b64decode(body))
    assert envelope["kdf"]["name"] == "scrypt" and envelope["cipher"]["name"] == "nacl/secretbox"
    params = envelope["kdf"]["params"]
    key = hashlib.scrypt(password, salt=base64.b64decode(envelope["kdf"]["salt"]), n=params["N"],
                         r=params["r"], p=params["p"], dklen=32, maxmem=2 ** 30)
    box = nacl.secret.SecretBox(key)
    return box.decrypt(base64.b64decode(envelope["ciphertext"]), base64.b64decode(envelope["cipher"]["nonce"]))


def simple_signing_payload(repository: str, digest: str) -> bytes:
    return json.dumps({"critical": {"identity": {"docker-reference": repository},
                                    "image": {"docker-manifest-digest": digest},
                                    "type": "cosign container image signature"},
                       "optional": None}).encode()


def test_signatures_follow_the_cosign_specification_both_ways(tmp_path: Path, registry: Registry):
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private, public = keygen(tmp_path, "team")
    pinned = push(READ_ONLY, registry.ref("team/read-only:1"))
    digest = pinned.split("@")[1]
    sign(pinned, private)

    # Portcullis' key and signature, checked by a verifier written from the spec.
    key = serialization.load_der_private_key(cosign_decrypt(private.read_text(), PASSWORD.encode()), None)
    verifier = serialization.load_pem_public_key(public.read_bytes())
    assert key.public_key().public_numbers() == verifier.public_numbers()
    signatures = json.loads(registry.get(f"team/read-only/manifests/{digest.replace(':', '-')}.sig"))
    [layer] = signatures["layers"]
    assert layer["mediaType"] == "application/vnd.dev.cosign.simplesigning.v1+json"
    payload = registry.get(f"team/read-only/blobs/{layer['digest']}", accept="*/*")
    critical = json.loads(payload)["critical"]
    assert critical["image"]["docker-manifest-digest"] == digest
    assert critical["type"] == "cosign container image signature"
    assert critical["identity"]["docker-reference"] == f"{registry.host}/team/read-only"
    signature = base64.b64decode(layer["annotations"]["dev.cosignproject.cosign/signature"])
    verifier.verify(signature, payload, ec.ECDSA(hashes.SHA256()))

    # A signature made here, as cosign makes one, accepted by Portcullis.
    theirs = ec.generate_private_key(ec.SECP256R1())
    their_public = tmp_path / "theirs.pub"
    their_public.write_bytes(theirs.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    other = push(ALLOWS, registry.ref("team/allows:1"))
    other_digest = other.split("@")[1]
    assert portcullis("policy", "verify", other, "--key", str(their_public), check=False).returncode == 1
    payload = simple_signing_payload(f"{registry.host}/team/allows", other_digest)
    signed = base64.b64encode(theirs.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()
    payload_digest = registry.put_blob("team/allows", payload)
    config = json.dumps({"architecture": "", "os": "", "rootfs": {"type": "layers", "diff_ids": [payload_digest]},
                         "config": {}}).encode()
    config_digest = registry.put_blob("team/allows", config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json", "digest": payload_digest,
                    "size": len(payload), "annotations": {"dev.cosignproject.cosign/signature": signed}}],
    }).encode()
    registry.put_manifest("team/allows", f"{other_digest.replace(':', '-')}.sig", manifest)
    verified = portcullis("policy", "verify", other, "--key", str(their_public))
    assert "is signed by theirs.pub" in verified.stdout
    # A payload naming another digest does not sign this one.
    assert portcullis("policy", "verify", pinned, "--key", str(their_public), check=False).returncode == 1
