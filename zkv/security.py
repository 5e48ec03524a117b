"""CURVE security: key files, the roles keys hold, and sockets set up to match.

zkv turns on CurveZMQ (authenticated encryption) with pyzmq's own ``zmq.auth``:
key files in its format (``zkv keygen``), and its ZAP authenticator thread,
which decides at each handshake whether a public key may connect at all. What a
connected key may *do* is decided per request from its role, so that a key
removed from its directory is cut off at once and one added works without a
restart (the directories are read again when they change).

The roles, most trusted first:

* ``cluster``: proxies and nodes. They share one key pair, the cluster key, which
  is also what every client expects the servers to present (its public half is
  the ``server_key``). Only cluster keys may use internal operations (XSEND,
  XBEGIN, replication, configuration pushes) or push into a node's PULL socket.
* ``admin``: data and admin operations (ADD, REMOVE, MOVE, REPLICA, FAILOVER,
  FLUSHALL).
* ``client``: data operations only.

Off loopback, a process without CURVE refuses to start unless told ``--insecure``.
Secret keys are never logged; a secret key file that others can read is refused.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import stat
from typing import Any

import zmq

from .config import SecurityConfig
from .errors import ConfigError, NoAuth, NoPerm

log = logging.getLogger("zkv.security")

CLUSTER, ADMIN, CLIENT = "cluster", "admin", "client"
# a non-cluster key that took a cluster link's routing id (whose replies a node never
# holds back): refused everything
IMPOSTOR = "impostor"
_RANK = {CLIENT: 1, ADMIN: 2, CLUSTER: 3}
DATA_DOMAIN = "zkv"  # proxy fronts and node ROUTERs: any known key may connect
CLUSTER_DOMAIN = "zkv-cluster"  # PULL sockets (moves, catch-up, backups): cluster keys only
RELOAD_EVERY = 1.0  # seconds between looks at the key directories
_SETTING = {CLUSTER: "cluster_keys", ADMIN: "admins", CLIENT: "clients"}
_LOG_EVERY = 10.0  # seconds between log lines about one refused key
_LOG_LINES = 20  # refusal lines in all per _LOG_EVERY (then a count): fresh keys are free


# --- key files ----------------------------------------------------------------------------


def keygen(prefix: str) -> tuple[str, str]:
    """Write a CURVE key pair ``PREFIX.key`` (public) and ``PREFIX.key_secret`` (secret,
    mode 0600) in zmq.auth's format; refuses to overwrite either."""
    directory, name = os.path.split(prefix)
    if not name or name.startswith("."):
        raise ConfigError(f"{prefix!r}: give a path ending in a key name, e.g. keys/alice")
    directory = directory or "."
    public, secret = (os.path.join(directory, name + ext) for ext in (".key", ".key_secret"))
    for path in (public, secret):
        if os.path.exists(path):
            raise ConfigError(f"{path} exists already; remove it first or choose another name "
                              "(a key is never overwritten)")
    try:
        os.makedirs(directory, exist_ok=True)
        old = os.umask(0o077)  # the secret file is never readable by others, not even briefly
        try:
            import zmq.auth

            zmq.auth.create_certificates(directory, name)
        finally:
            os.umask(old)
        os.chmod(public, 0o644)
        os.chmod(secret, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot write keys in {directory}: {exc.strerror or exc}") from None
    return public, secret


def load_secret(path: str, what: str = "--curve-key") -> tuple[bytes, bytes]:
    """(public, secret) of a secret key file, refused if it is not one or others can read it."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{what} {path}: not a file")
    public, secret = _load(path, what)
    if secret is None:
        raise ConfigError(f"{what} {path}: holds no secret key (that is the public half; "
                          "give the .key_secret file)")
    if mode & 0o077:
        raise ConfigError(
            f"{what} {path}: the secret key file is readable by others (mode "
            f"{stat.S_IMODE(mode):04o}); run chmod 600 {path}")
    return public, secret


def load_public(path: str, what: str = "--server-key") -> bytes:
    """The public key in a key file (either half of a pair)."""
    return _load(path, what)[0]


def _load(path: str, what: str) -> tuple[bytes, bytes | None]:
    try:
        import zmq.auth

        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} {path}: not a key file ({exc})") from None
    if len(public) != 40 or (secret is not None and len(secret) != 40):
        raise ConfigError(f"{what} {path}: not a key file (a key is 40 Z85 characters)")
    return public, secret


# --- who holds which role -----------------------------------------------------------------


class Keyring:
    """The public keys of each role, read from their directories and read again when a
    directory changes (at most every RELOAD_EVERY seconds, from :meth:`refresh`)."""

    def __init__(self, dirs: dict[str, str | None], cluster_key: bytes) -> None:
        self.dirs = {role: d for role, d in dirs.items() if d}
        self.cluster_key = cluster_key
        self.roles: dict[str, str] = {}
        self._signature: Any = None
        self._next = 0.0
        for role, directory in self.dirs.items():
            if not os.path.isdir(directory):
                name = _SETTING[role]
                raise ConfigError(f"{name} {directory}: not a directory (the {role} keys' "
                                  f"directory: --{name.replace('_', '-')} or security.{name})")
        self.reload(strict=True)

    def _scan(self) -> Any:
        out: list[tuple[str, list[tuple[str, int]] | None]] = []
        for role, directory in sorted(self.dirs.items()):
            try:
                with os.scandir(directory) as it:
                    out.append((role, sorted((e.name, e.stat().st_mtime_ns) for e in it
                                             if e.name.endswith(".key"))))
            except OSError:
                out.append((role, None))
        return out

    def reload(self, strict: bool = False, signature: Any = None) -> None:
        """Read every directory's ``*.key`` files. A file that is not a public key is
        skipped (and logged by name), never the rest; with ``strict`` (at start), a
        directory that cannot be read is a ConfigError."""
        roles = {self.cluster_key.decode(): CLUSTER}
        if signature is None:
            signature = self._scan()
        for role, directory in self.dirs.items():
            try:
                names = sorted(n for n in os.listdir(directory) if n.endswith(".key"))
            except OSError as exc:
                if strict:
                    raise ConfigError(f"{_SETTING[role]} {directory}: cannot read it: "
                                      f"{exc.strerror or exc}") from None
                log.error("cannot read the %s keys in %s: %s (none of them is allowed "
                          "until it can be read)", role, directory, exc.strerror or exc)
                continue
            for name in names:
                path = os.path.join(directory, name)
                try:
                    key = _load(path, _SETTING[role])[0]
                except ConfigError as exc:
                    log.error("skipping %s: %s", path, exc)
                    continue
                text = key.decode()
                if _RANK[role] > _RANK.get(roles.get(text, ""), 0):
                    roles[text] = role
        self.roles, self._signature = roles, signature

    def refresh(self, now: float) -> bool:
        """Read the directories again if they changed; whether they had."""
        if now < self._next:
            return False
        self._next = now + RELOAD_EVERY
        signature = self._scan()
        if signature == self._signature:
            return False
        before = self.roles
        self.reload(signature=signature)
        log.info("key directories changed: %d keys allowed (was %d)", len(self.roles),
                 len(before))
        return True

    def role(self, user: str) -> str | None:
        """The role of a connection's User-Id (its public key, Z85), None if none now."""
        return self.roles.get(user)

    def admits(self, domain: str, key: str) -> bool:
        role = self.roles.get(key)
        return role is not None and (domain != CLUSTER_DOMAIN or role == CLUSTER)


# The internal operations the routing core itself sends while a key moves (zkv.core.router):
# it runs in the direct client too, so a data key may send them. Each reads or writes
# one key, as GET/SET/DEL by that key could.
ROUTING_OPS = frozenset(("XGET", "XPEEK", "XFILL", "XSEEN", "XDEL"))


def permits(role: str | None, kind: str, op: str = "") -> bool:
    """Whether a key of ``role`` may run ``op``, a command of ``kind`` (zkv.core.protocol's
    kinds)."""
    if role == IMPOSTOR:
        return False
    if kind == "internal":
        return role == CLUSTER or (role is not None and op in ROUTING_OPS)
    if kind == "admin":
        return role in (ADMIN, CLUSTER)
    return role is not None


def require(role: str | None, op: str, kind: str, where: str) -> None:
    """Raise NoAuth (no allowed key) or NoPerm (a key without the role) unless a key of
    ``role`` may run ``op``, a command of ``kind``, at ``where``."""
    if permits(role, kind, op):
        return
    if role is None:
        raise NoAuth(f"{where}: this connection's key is not (or no longer) allowed")
    if role == IMPOSTOR:
        raise NoPerm(f"{where}: routing ids starting with zkv-router/ are kept for the "
                     "cluster's own links; this connection's key is not a cluster key")
    need = "a cluster key" if kind == "internal" else "an admin key"
    raise NoPerm(f"{where}: {op} needs {need}; this connection's key is {_article(role)} "
                 f"{role} key")


def _article(role: str) -> str:
    return "an" if role[:1] in "aeiou" else "a"


class Curve:
    """A process's CURVE identity: its key pair, the server key it expects, and (for a
    server) the keyring and authenticator that check its peers."""

    def __init__(self, public: bytes, secret: bytes, server_public: bytes,
                 keyring: Keyring | None = None) -> None:
        self.public, self.secret, self.server_public = public, secret, server_public
        self.keyring = keyring
        self._auth: Any = None  # (zkv.zap's authenticator, once started)

    @classmethod
    def client(cls, curve_key: str, server_key: str | None = None) -> Curve:
        """A client's: its secret key file, and the servers' public key file (by default
        the public half of its own key: a cluster process talking to its cluster)."""
        public, secret = load_secret(curve_key, "curve_key")
        server = load_public(server_key, "server_key") if server_key else public
        return cls(public, secret, server)

    def start(self, ctx: zmq.Context[Any], what: str) -> None:
        """Start the ZAP authenticator on ``ctx`` (before any server socket binds: with no
        authenticator, a CURVE server would take any key)."""
        if self.keyring is None:
            raise ConfigError(f"{what}: a server needs its key directories")
        from .zap import Authenticator  # (pyzmq's ZAP thread imports asyncio: only here)

        auth = Authenticator(ctx, self.keyring, what)
        auth.start()
        self._auth = auth

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def serve(self, sock: zmq.Socket[Any], domain: str = DATA_DOMAIN) -> None:
        """Make ``sock`` a CURVE server in ``domain`` (call before bind)."""
        assert self._auth is not None, "start the authenticator before serving"
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())

    def connect(self, sock: zmq.Socket[Any], server_public: bytes | None = None) -> None:
        """Make ``sock`` a CURVE client of a server with ``server_public`` (call before
        connect)."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_public or self.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)


def curve_for(settings: SecurityConfig, what: str) -> Curve | None:
    """The Curve of a cluster process (proxy, follower, node) from its settings, or None
    when it runs without CURVE. The cluster key is its own key; the key directories
    are checked now, so a mistake stops the start with the flag or field named."""
    if settings.key is None:
        for name in ("server_key", "cluster_keys", "clients", "admins"):
            if getattr(settings, name):
                raise ConfigError(f"{what}: {name} is given but no key (--curve-key): "
                                  "CURVE needs this process's secret key")
        return None
    public, secret = load_secret(settings.key)
    server = load_public(settings.server_key) if settings.server_key else public
    keyring = Keyring({CLUSTER: settings.cluster_keys, CLIENT: settings.clients,
                       ADMIN: settings.admins}, public)
    return Curve(public, secret, server, keyring)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, curve: Curve | None, insecure: bool, what: str) -> None:
    """Refuse to listen off loopback without CURVE unless told ``insecure`` (and a host
    that does not resolve at all, first: that is the mistake to name)."""
    if curve is None and not insecure and not is_loopback(host):
        try:
            socket.getaddrinfo(host.strip("[]"), None)
        except (socket.gaierror, UnicodeError) as exc:
            raise ConfigError(f"{what} cannot listen on {host}: no such host or address "
                              f"({getattr(exc, 'strerror', None) or exc})") from None
        raise ConfigError(
            f"{what} would listen on {host} without CURVE: anyone who can reach it could "
            "read and write every key and change the cluster. Give it keys (--curve-key and "
            "the key directories, or a topology's security section; see the README's "
            "Security section), or pass --insecure on a network you trust")


def check_resp_exposure(host: str, password: str | None, insecure: bool, what: str) -> None:
    """Refuse a RESP front off loopback without a password unless told ``insecure``."""
    if password is None and not insecure and not is_loopback(host):
        raise ConfigError(
            f"{what} would listen on {host} with no password: RESP cannot use CURVE, so "
            "anyone who can reach it could read and write every key. Give it a password "
            "(--resp-password-file, or security.resp_password_file) and keep it on a "
            "trusted network or behind TLS termination (stunnel), or pass --insecure")


def read_password(path: str) -> str:
    """The RESP front's AUTH password: the first line of a file only its owner reads."""
    try:
        mode = os.stat(path).st_mode
        with open(path, encoding="utf-8") as f:
            text = f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"resp password file {path}: {getattr(exc, 'strerror', None) or exc}"
                          ) from None
    if mode & 0o077:
        raise ConfigError(f"resp password file {path}: readable by others (mode "
                          f"{stat.S_IMODE(mode):04o}); run chmod 600 {path}")
    if not text:
        raise ConfigError(f"resp password file {path}: the first line (the password) is empty")
    return text


__all__ = ["ADMIN", "CLIENT", "CLUSTER", "CLUSTER_DOMAIN", "DATA_DOMAIN", "IMPOSTOR", "Curve",
           "Keyring", "check_exposure", "check_resp_exposure", "curve_for", "is_loopback",
           "keygen", "load_public", "load_secret", "permits", "read_password", "require"]
