"""Who may call what: cluster credentials, TLS material and the server-side check.

Two kinds of callers:

- **nodes** (master, shards, workers) call the node RPCs (register, heartbeat, progress,
  push, pull, membership, end-job, shared-memory attach). A node proves it belongs to
  the cluster with a client certificate signed by the cluster's CA (TLS clusters) or
  the cluster's node token (``PSTRAIN_NODE_TOKEN`` / ``PSTRAIN_NODE_TOKEN_FILE``).
- **users** (psctl, ``fit(cluster=...)``) call the user RPCs (submit, status, list,
  logs, cancel, export, plan, scale, nodes) with a user token (``PSTRAIN_TOKEN`` /
  ``PSTRAIN_TOKEN_FILE``, or the cluster file psctl up writes). The master knows user
  tokens from its token file (``psctl token create``; hashes only) and its admin token
  (``PSTRAIN_ADMIN_TOKEN``); a job may be cancelled, scaled or exported only by its
  submitter or an admin.

A call carries every credential its process has (``authorization: Bearer <user
token>``, ``x-pstrain-node-token``, its certificate); the server checks the one its
method needs. No valid credential: UNAUTHENTICATED; a valid one of the wrong kind:
PERMISSION_DENIED. Tokens are compared as SHA-256 digests in constant time.

TLS (``PSTRAIN_TLS_DIR`` / ``--tls-dir``, made by ``psctl certs init``) is mutual: every
caller presents a certificate of the cluster's CA, and a caller without one is refused
in the TLS handshake, before any RPC runs. Server names are fixed per role
(``master.pstrain``, ``ps.pstrain``), so certificates do not depend on addresses.

Usage::

    creds = Credentials.from_env("worker")        # what this process presents
    channel = rpc.make_channel(address, "ps", creds)
    server = rpc.make_server(authenticator=Authenticator.from_env(...))
"""
from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import stat
import threading
from dataclasses import dataclass, field
from typing import Iterable

import grpc

NODE_ROLES = ("master", "ps", "worker")
CERT_ROLES = NODE_ROLES + ("user",)
NODE_TOKEN_HEADER = "x-pstrain-node-token"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class SecurityError(ValueError):
    """Credentials that cannot be used (a missing file, an unreadable token)."""


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def read_secret(value: str | None, path: str | None, what: str) -> str:
    if value:
        return value.strip()
    if path:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError as exc:
            raise SecurityError(f"cannot read the {what} from {path}: {exc.strerror}") from None
    return ""


def write_private(path: str, text: str, mode: int = 0o600) -> None:
    """Write ``text`` to ``path`` with ``mode`` from creation on (by default readable by
    its owner only)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---- what a process presents -------------------------------------------------------------------
@dataclass(frozen=True)
class TLSFiles:
    """A TLS directory: ``ca.crt`` and ``<role>.crt``/``<role>.key`` for this process's role."""

    directory: str
    role: str

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(CA certificate, this role's certificate, its key), PEM."""
        out = []
        for name in ("ca.crt", f"{self.role}.crt", f"{self.role}.key"):
            path = os.path.join(self.directory, name)
            try:
                with open(path, "rb") as f:
                    out.append(f.read())
            except OSError as exc:
                raise SecurityError(f"TLS: cannot read {path} ({exc.strerror}); make the files with "
                                    f"'psctl certs init {self.directory}'") from None
        return out[0], out[1], out[2]


@dataclass(frozen=True)
class Credentials:
    """What one process presents when it calls a service: a user token, the cluster's
    node token, and (TLS clusters) its role's certificate."""

    user_token: str = ""
    node_token: str = ""
    tls: TLSFiles | None = None

    @classmethod
    def from_env(cls, role: str = "user") -> "Credentials":
        tls_dir = os.environ.get("PSTRAIN_TLS_DIR", "")
        return cls(
            user_token=read_secret(os.environ.get("PSTRAIN_TOKEN"), os.environ.get("PSTRAIN_TOKEN_FILE"), "user token"),
            node_token=node_token_from_env(),
            tls=TLSFiles(tls_dir, role) if tls_dir else None,
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        out = []
        if self.user_token:
            out.append(("authorization", f"Bearer {self.user_token}"))
        if self.node_token:
            out.append((NODE_TOKEN_HEADER, self.node_token))
        return tuple(out)


_process: Credentials | None = None
_process_lock = threading.Lock()


def process_credentials() -> Credentials:
    """What a channel made without explicit credentials presents: the environment's
    (``PSTRAIN_TOKEN``, ``PSTRAIN_NODE_TOKEN``, ``PSTRAIN_TLS_DIR``), read once. Services
    and psctl pass theirs explicitly; this is for scripts and tests."""
    global _process
    with _process_lock:
        if _process is None:
            _process = Credentials.from_env()
        return _process


class _Metadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the credentials' metadata to every call on a channel."""

    def __init__(self, metadata):
        self._metadata = tuple(metadata)

    def _details(self, details):
        meta = tuple(details.metadata or ()) + self._metadata
        return _CallDetails(details.method, details.timeout, meta, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


def secure_channel(address: str, server_role: str, creds: Credentials, options: list) -> grpc.Channel:
    """A channel presenting ``creds``: TLS to a ``server_role`` service when it has TLS
    files, plaintext otherwise."""
    if creds.tls is not None:
        ca, cert, key = creds.tls.read()
        channel_creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        options = list(options) + [("grpc.ssl_target_name_override", f"{server_role}.pstrain")]
        channel = grpc.secure_channel(address, channel_creds, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    meta = creds.metadata()
    return grpc.intercept_channel(channel, _Metadata(meta)) if meta else channel


# ---- what a server accepts ------------------------------------------------------------------------
@dataclass(frozen=True)
class Caller:
    """Who made a call: ``kind`` "node", "user", or "certificate" (the cluster's user
    certificate alone, which names no user); ``name``: the user or node role."""

    kind: str
    name: str
    admin: bool = False


class UserTokens:
    """The master's user tokens: a JSON file of {digest: {"name", "admin"}} (written by
    ``psctl token create``; read again when it changes) plus an admin token."""

    def __init__(self, path: str = "", admin_token: str = ""):
        self.path = path
        self._admin = token_digest(admin_token) if admin_token else ""
        self._entries: dict[str, dict] = {}
        self._stamp = None
        self._lock = threading.Lock()

    @staticmethod
    def add(path: str, name: str, admin: bool = False) -> str:
        """Create a token for user ``name`` in the file at ``path``; returns it."""
        token = new_token()
        UserTokens.register(path, token, name, admin)
        return token

    @staticmethod
    def register(path: str, token: str, name: str, admin: bool = False, mode: int = 0o600) -> bool:
        """Record ``token`` (its digest only) for user ``name`` in the file at ``path``,
        replaced atomically: a new file gets ``mode``, a rewritten one keeps its own.
        Returns whether the file changed."""
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"a user name must be non-empty without spaces, got {name!r}")
        entries = UserTokens._load(path)
        entry = {"name": name, "admin": bool(admin)}
        if entries.get(token_digest(token)) == entry:
            return False
        entries[token_digest(token)] = entry
        UserTokens._save(path, entries, mode)
        return True

    @staticmethod
    def revoke(path: str, name: str) -> int:
        """Remove every token of user ``name`` from the file at ``path`` (a master reading
        it refuses them from its next call on); returns how many there were."""
        entries = UserTokens._load(path)
        kept = {digest: entry for digest, entry in entries.items() if entry.get("name") != name}
        if len(kept) < len(entries):
            UserTokens._save(path, kept)
        return len(entries) - len(kept)

    @staticmethod
    def users(path: str) -> dict[str, dict]:
        """{name: {"tokens": how many, "admin": whether any of them is an admin's}}."""
        found: dict[str, dict] = {}
        for entry in UserTokens._load(path).values():
            user = found.setdefault(str(entry.get("name", "?")), {"tokens": 0, "admin": False})
            user["tokens"] += 1
            user["admin"] = user["admin"] or bool(entry.get("admin", False))
        return found

    @staticmethod
    def _save(path: str, entries: dict, mode: int = 0o600) -> None:
        """Replace the file atomically: a new one gets ``mode``, a rewritten one keeps its own."""
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            pass
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        tmp = f"{path}.tmp"
        write_private(tmp, json.dumps(entries, indent=1, sort_keys=True), mode)
        os.replace(tmp, path)

    @staticmethod
    def _load(path: str) -> dict:
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise SecurityError(f"cannot read the token file {path}: {exc}") from None
        if not isinstance(data, dict):
            raise SecurityError(f"the token file {path} is not a JSON object")
        return data

    def _current(self) -> dict:
        if not self.path:
            return {}
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._entries = self._load(self.path) if stamp is not None else {}
                self._stamp = stamp
            return self._entries

    def lookup(self, token: str) -> Caller | None:
        digest = token_digest(token)
        if self._admin and hmac.compare_digest(digest, self._admin):
            return Caller("user", "admin", admin=True)
        found = None
        for stored, entry in self._current().items():  # every entry compared: no early exit
            if hmac.compare_digest(digest, stored):
                found = Caller("user", str(entry.get("name", "?")), admin=bool(entry.get("admin", False)))
        return found


@dataclass
class Authenticator:
    """The server-side check: ``methods`` maps a full method name ("/pkg.Service/Name")
    to "node" or "user"; a method not listed is refused."""

    methods: dict[str, str]
    node_token: str = ""
    users: UserTokens = field(default_factory=UserTokens)

    def __post_init__(self):
        self._node_digest = token_digest(self.node_token) if self.node_token else ""

    def identify(self, metadata: Iterable, auth_context: dict) -> list[Caller]:
        """Every identity the call proves (a certificate, a node token, a user token)."""
        found = []
        names = auth_context.get("x509_common_name") or []
        for raw in names:
            cn = raw.decode() if isinstance(raw, bytes) else str(raw)
            role = cn[len("pstrain-"):] if cn.startswith("pstrain-") else ""
            if role in NODE_ROLES:
                found.append(Caller("node", role))
            elif role == "user":  # the cluster's user certificate opens the connection; a token names the user
                found.append(Caller("certificate", "user"))
        for key, value in metadata:
            if key == NODE_TOKEN_HEADER and self._node_digest and hmac.compare_digest(token_digest(value), self._node_digest):
                found.append(Caller("node", "token"))
            elif key == "authorization" and value.startswith("Bearer "):
                user = self.users.lookup(value[len("Bearer "):].strip())
                if user is not None:
                    found.append(user)
        return found

    def check(self, method: str, metadata, auth_context) -> tuple[Caller | None, grpc.StatusCode | None, str]:
        """(the caller, or None with the status and message to refuse with)."""
        need = self.methods.get(method)
        short = method.rsplit("/", 1)[-1]
        if need is None:
            return None, grpc.StatusCode.PERMISSION_DENIED, f"{method} is not a method this service serves to anyone"
        callers = self.identify(metadata, auth_context)
        for caller in callers:
            if caller.kind == need:
                return caller, None, ""
        if callers:
            what = callers[0]
            who = {"user": f"user '{what.name}'", "node": "a cluster node"}.get(what.kind, "a user certificate alone")
            return None, grpc.StatusCode.PERMISSION_DENIED, (
                f"{short} is a {need} call; {who} may not make it"
                + (" (nodes authenticate with the cluster's certificate or node token)" if need == "node" else
                   " (users authenticate with a user token: PSTRAIN_TOKEN, or psctl token create)"))
        return None, grpc.StatusCode.UNAUTHENTICATED, (
            f"{short} needs {'a user token (PSTRAIN_TOKEN, the cluster file psctl up writes, or psctl token create)' if need == 'user' else 'the cluster node credentials (certificate or node token)'}; "
            "the call carried none that this cluster accepts")


_caller_local = threading.local()


def current_caller() -> Caller | None:
    """The caller of the RPC this thread is serving (None outside an authenticated call)."""
    return getattr(_caller_local, "caller", None)


class AuthInterceptor(grpc.ServerInterceptor):
    """Runs :class:`Authenticator` before every method; a refused call never reaches it."""

    def __init__(self, authenticator: Authenticator):
        self.auth = authenticator

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        method, check = details.method, self.auth.check

        def admit(context) -> None:
            caller, code, message = check(method, context.invocation_metadata(), context.auth_context())
            if caller is None:
                context.abort(code, message)
            _caller_local.caller = caller

        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            def unary(request, context):
                admit(context)
                try:
                    return behavior(request, context)
                finally:
                    _caller_local.caller = None

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            def streaming(request, context):
                admit(context)
                try:
                    yield from stream(request, context)
                finally:
                    _caller_local.caller = None

            return grpc.unary_stream_rpc_method_handler(streaming, handler.request_deserializer,
                                                        handler.response_serializer)
        raise ValueError(f"{method}: streaming requests are not served")


def node_token_from_env() -> str:
    return read_secret(os.environ.get("PSTRAIN_NODE_TOKEN"), os.environ.get("PSTRAIN_NODE_TOKEN_FILE"), "node token")


def admin_token_from_env() -> str:
    return read_secret(os.environ.get("PSTRAIN_ADMIN_TOKEN"), os.environ.get("PSTRAIN_ADMIN_TOKEN_FILE"), "admin token")


def service_credentials(role: str, tls_dir: str = "") -> Credentials:
    """A service's own credentials: the cluster's node token from the environment
    (``PSTRAIN_NODE_TOKEN`` / ``_FILE``) and its role's TLS files (``tls_dir``, its
    config's, else ``PSTRAIN_TLS_DIR``); one of them is required."""
    node_token = node_token_from_env()
    tls_dir = tls_dir or os.environ.get("PSTRAIN_TLS_DIR", "")
    if not node_token and not tls_dir:
        raise SecurityError("no cluster credentials: set PSTRAIN_NODE_TOKEN (or PSTRAIN_NODE_TOKEN_FILE; psctl up "
                            "makes one) or give --tls-dir / PSTRAIN_TLS_DIR (psctl certs init)")
    creds = Credentials(node_token=node_token, tls=TLSFiles(tls_dir, role) if tls_dir else None)
    if creds.tls is not None:
        creds.tls.read()  # fail now, naming the file, rather than at the first call
    return creds


def methods_of(service_descriptor, kinds: dict[str, str], default: str | None = None) -> dict[str, str]:
    """{full method name: "node" | "user"} for a protobuf service: ``kinds`` by method
    name, ``default`` for the rest (None: each method must be listed)."""
    out = {}
    for m in service_descriptor.methods:
        kind = kinds.get(m.name, default)
        if kind is None:
            raise ValueError(f"{service_descriptor.full_name}.{m.name}: say who may call it (node or user)")
        out[f"/{service_descriptor.full_name}/{m.name}"] = kind
    return out


def server_credentials(tls: TLSFiles) -> grpc.ServerCredentials:
    """Mutual TLS: this role's certificate; every caller must present one of the CA's."""
    ca, cert, key = tls.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


# ---- certificates (psctl certs init) ---------------------------------------------------------------
def make_certificates(directory: str, hosts: Iterable[str] = (), days: int = 365, roles=CERT_ROLES) -> list[str]:
    """A cluster CA (``ca.crt``, ``ca.key``) and a certificate and key per role in
    ``directory`` (0700; keys 0600). A role's certificate names it (CN ``pstrain-<role>``,
    DNS ``<role>.pstrain``, plus ``hosts``) and serves as server and client. Returns the
    files written. An existing CA is reused, so roles can be added later."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    now = datetime.datetime.now(datetime.timezone.utc)
    written = []

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_crt, ca_key_path = os.path.join(directory, "ca.crt"), os.path.join(directory, "ca.key")
    if os.path.exists(ca_crt) and os.path.exists(ca_key_path):
        with open(ca_crt, "rb") as f:
            ca_cert = x509.load_pem_x509_certificate(f.read())
        with open(ca_key_path, "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), password=None)
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pstrain cluster CA")])
        ca_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=max(days, 1) * 5))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False, data_encipherment=False,
                                                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
                   .sign(ca_key, hashes.SHA256()))
        write_private(ca_key_path, pem_key(ca_key).decode())
        with open(ca_crt, "wb") as f:
            f.write(ca_cert.public_bytes(serialization.Encoding.PEM))
        written += [ca_crt, ca_key_path]

    for role in roles:
        if role not in CERT_ROLES:
            raise ValueError(f"unknown role {role!r}; roles: {', '.join(CERT_ROLES)}")
        key = ec.generate_private_key(ec.SECP256R1())
        alt: list = [x509.DNSName(f"{role}.pstrain")]
        for host in hosts:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                alt.append(x509.DNSName(host))
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pstrain-{role}")]))
                .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName(alt), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        crt_path, key_path = os.path.join(directory, f"{role}.crt"), os.path.join(directory, f"{role}.key")
        write_private(key_path, pem_key(key).decode())
        with open(crt_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        written += [crt_path, key_path]
    return written


# What ``psctl certs init`` writes besides the certificates, and who reads what. The
# cluster's services read their role's key and the node token; the master also reads
# tokens.json, which holds only digests (SHA-256 of 256-bit random tokens: nothing to
# guess from) and so may be read by anyone. The user reads user.key and admin.token, and
# ca.key signs certificates. Compose mounts secrets with their host owner and mode, so the
# services' private files must belong to the containers' user and the user's to the user:
# no private file is read by both.
SERVICE_SECRETS = tuple(f"{role}.key" for role in NODE_ROLES) + ("node.token",)
USER_SECRETS = ("ca.key", "user.key", "admin.token")
TOKENS_FILE = "tokens.json"


def make_cluster_tokens(directory: str) -> list[str]:
    """The cluster's node token and admin token in ``directory`` (0600; kept when present),
    and ``tokens.json`` (0644, digests only) naming the admin token's holder the admin, so a
    master given that file (``--tokens-file``) needs no copy of the token itself. Returns
    the files written."""
    written = []
    for name in ("node.token", "admin.token"):
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            write_private(path, new_token() + "\n")
            written.append(path)
    users = os.path.join(directory, TOKENS_FILE)
    admin = read_secret(None, os.path.join(directory, "admin.token"), "admin token")
    if UserTokens.register(users, admin, "admin", admin=True, mode=0o644):
        written.append(users)
    return written


def hand_over(directory: str, owner: tuple[int, int], user: tuple[int, int] | None = None) -> list[str]:
    """Give the services' private files in ``directory`` (``SERVICE_SECRETS``) to
    ``owner`` (uid, gid), e.g. the containers' user; with ``user``, the directory and every
    other file to ``user`` (the person who ran ``sudo psctl certs init``). Changing an
    owner needs root: PermissionError otherwise. Returns the files given to ``owner``."""
    given = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name in SERVICE_SECRETS:
            os.chown(path, *owner, follow_symlinks=False)
            given.append(path)
        elif user is not None:
            os.chown(path, *user, follow_symlinks=False)
    if user is not None:
        os.chown(directory, *user)
    return given
