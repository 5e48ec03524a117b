"""The ZAP side of zkv.security: pyzmq's authenticator thread, asking a keyring which
keys may connect (kept apart: pyzmq's thread imports asyncio, which a process without
CURVE has no need of)."""

from __future__ import annotations

import logging
import time
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from .security import _LOG_EVERY, _LOG_LINES, CLUSTER_DOMAIN, DATA_DOMAIN, Keyring, _article

log = logging.getLogger("zkv.security")


class Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP thread, asking the keyring; refusals logged (by public key, at most
    once per key every _LOG_EVERY seconds)."""

    def __init__(self, ctx: zmq.Context[Any], keyring: Keyring, what: str) -> None:
        super().__init__(ctx, log=logging.getLogger("zkv.zap"))
        self.keyring = keyring
        self.what = what
        self._address = ""
        self._logged: dict[str, float] = {}  # key -> when its refusal was last logged
        self._window, self._lines, self._unlogged = -_LOG_EVERY, 0, 0
        for domain in (DATA_DOMAIN, CLUSTER_DOMAIN):
            self.configure_curve_callback(domain, self)

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._address = msg[3].decode(errors="replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    def callback(self, domain: str, key: bytes) -> bool:
        text = key.decode()
        if self.keyring.admits(domain, text):
            return True
        now = time.monotonic()
        if now - self._window >= _LOG_EVERY:  # a new window: say what was not logged
            if self._unlogged:
                log.warning("%s refused %d more connections in the last %d s (not logged "
                            "one by one)", self.what, self._unlogged, int(_LOG_EVERY))
            self._window, self._lines, self._unlogged = now, 0, 0
        if (now - self._logged.get(text, -_LOG_EVERY) < _LOG_EVERY
                or self._lines >= _LOG_LINES):
            self._unlogged += 1
            return False
        if len(self._logged) > 1000:
            self._logged.clear()
        self._logged[text] = now
        self._lines += 1
        known = self.keyring.role(text)
        why = (f"{_article(known)} {known} key, and only cluster keys may connect here"
               if known else "not an allowed key")
        log.warning("%s refused a connection from %s: key %s is %s", self.what,
                    self._address, text, why)
        return False
