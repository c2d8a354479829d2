"""Password and secret hashing with the standard library only.

* :func:`hash_password` / :func:`verify_password` -- user passwords: scrypt (memory-hard), stored as
  ``scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>``.
* :func:`hash_device_password` -- device MQTT passwords in Mosquitto's own PBKDF2-SHA512 format
  (``$7$<iterations>$<salt b64>$<hash b64>``, what ``mosquitto_passwd`` writes), so a Mosquitto password file can
  be exported straight from the database (``cloud.db.repo.mosquitto_password_file``). Device passwords are
  random 192-bit tokens, so brute force is not the threat a slow hash guards against.
* :func:`token_digest` -- sha256 hex of API tokens (high-entropy random tokens need no salt or stretching).

:func:`verify_password` accepts both formats and compares in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MOSQUITTO_ITERATIONS = 1000


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def hash_device_password(password: str, iterations: int = MOSQUITTO_ITERATIONS) -> str:
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str | None) -> bool:
    """True if ``password`` matches ``stored`` (either format). Never raises on a malformed hash."""
    if not stored:
        return False
    try:
        if stored.startswith("scrypt$"):
            _, n, r, p, salt, expected = stored.split("$")
            digest = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                                    dklen=len(base64.b64decode(expected)))
            return hmac.compare_digest(digest, base64.b64decode(expected))
        if stored.startswith("$7$"):
            _, _, iterations, salt, expected = stored.split("$")
            digest = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iterations))
            return hmac.compare_digest(digest, base64.b64decode(expected))
    except (ValueError, TypeError):
        return False
    return False


def dummy_verify() -> None:
    """Spend the time of one verification (login for an unknown user takes as long as a wrong password)."""
    verify_password("x", _DUMMY)


_DUMMY = hash_password(secrets.token_urlsafe(8))


def new_secret(nbytes: int = 24) -> str:
    """A random URL-safe secret (device passwords, API tokens)."""
    return secrets.token_urlsafe(nbytes)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
