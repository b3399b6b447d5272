"""API keys: ``Authorization: Bearer <key>``, compared in constant time, never logged."""

from __future__ import annotations

import hashlib
import hmac

from pydantic import SecretStr

from forcedphot.api.problems import Problem

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="forcedphot"'}
ANONYMOUS = "anonymous"


class ApiKeys:
    """The accepted keys; with none configured every request is let through (demo mode)."""

    def __init__(self, keys: list[SecretStr]):
        self._keys = [key.get_secret_value().encode() for key in keys]

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._keys)} keys)"

    def check(self, authorization: str | None) -> str:
        """The caller's identity (a digest of its key, or "anonymous" in demo mode); a 401
        problem unless ``authorization`` carries an accepted bearer key.

        Every key is compared (``hmac.compare_digest``) so the time taken does not tell
        which key, or how much of one, matched.
        """
        if not self._keys:
            return ANONYMOUS
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Problem(401, "unauthorized", "this service needs an API key: send 'Authorization: Bearer <key>'", headers=CHALLENGE)
        given = token.strip().encode("utf-8", "surrogateescape")
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(given, key)
        if not matched:
            raise Problem(401, "unauthorized", "the API key is not valid", headers=CHALLENGE)
        return hashlib.sha256(given).hexdigest()[:16]
