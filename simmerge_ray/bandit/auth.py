"""The bandit's write token: who may post feedback and add arms.

Feedback and new arms change what every later caller is told, so they need a shared secret;
decisions and the GET endpoints stay open (they only read, or hand out a draw). The token comes
from a file (`--token-file`, e.g. a mounted Kubernetes Secret) or from SIMMERGE_BANDIT_TOKEN.
The HTTP replicas hold only its SHA-256 digest, so the secret is never part of the Serve
application's arguments; requests are compared digest to digest with `hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from simmerge_ray.bandit.errors import BanditError
from simmerge_ray.errors import ConfigError

TOKEN_ENV = "SIMMERGE_BANDIT_TOKEN"
MIN_TOKEN_CHARS = 16


class AuthError(BanditError):
    """A write request without the right token."""

    http_status = 401


def load_token(token_file: Path | None = None) -> str:
    """The token from `token_file` (surrounding whitespace dropped), else from SIMMERGE_BANDIT_TOKEN."""
    if token_file is not None:
        try:
            token, where = Path(token_file).read_text().strip(), str(token_file)
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{token_file}: cannot read the bandit token ({e.__class__.__name__})") from None
    else:
        token, where = os.environ.get(TOKEN_ENV, "").strip(), TOKEN_ENV
        if not token:
            raise ConfigError(f"no bandit token: pass --token-file FILE or set {TOKEN_ENV} "
                              "(POST /feedback and /arms require it)")
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"{where}: the bandit token must have at least {MIN_TOKEN_CHARS} characters")
    check_sendable(token, where)
    return token


def check_sendable(token: str, where: str) -> None:
    """Refuse a token that no client can send in an `Authorization` header: a line break (a file
    of two lines), a tab or another control character, or a non-ASCII letter (headers travel as
    Latin-1). Such a token was accepted, and every write then answered 401."""
    bad = next((c for c in token if not " " <= c <= "~"), None)
    if bad is not None:
        raise ConfigError(f"{where}: the bandit token holds {bad!r} at character {token.index(bad) + 1}; "
                          "a token must be one line of printable ASCII (an HTTP header cannot carry it otherwise)")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_authorization(header: str | None, digest: str) -> None:
    """Raise AuthError unless `header` is `Bearer <token>` for the token whose digest is `digest`."""
    scheme, _, presented = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise AuthError("authorization: send the bandit token as 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(token_digest(presented.strip()), digest):
        raise AuthError("authorization: wrong bandit token")
