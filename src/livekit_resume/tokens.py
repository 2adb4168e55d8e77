"""Reconnect tokens: a back end hands a web or mobile client a signed, expiring token
naming one conversation; presented in a new room (dispatch metadata, a participant
attribute), it resumes that conversation and nothing else.

A token is ``lkrt1.<payload>.<mac>`` (base64url): the payload is msgpack
``[namespace, key, conversation, expires_at, kid]``, the MAC an HMAC-SHA256 over
``lkrt1.<payload>`` with the signing key ``kid`` (``RESUME_SIGNING_KEYS``, so keys rotate
as they do for snapshots). Verification checks the MAC, the expiry, the namespace, and
that the key's latest snapshot is still that conversation and not ended: ending a
conversation (`ResumableSession.end`) revokes every token issued for it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import math
import time
from collections.abc import Sequence
from typing import Any

import msgpack

from .bridge import codec_for, from_stored
from .errors import SignatureMismatch, SnapshotCorrupt, SnapshotNotFound, TokenRefused
from .settings import Settings
from .snapshot.codec import Codec
from .snapshot.frame import Keyring
from .stores.base import Store, validate_key

__all__ = ["issue_token", "verify_token"]

PREFIX = "lkrt1"
# A token rides in dispatch metadata or a participant attribute: keep it small, and
# refuse anything larger before decoding it.
MAX_TOKEN = 2048


def _keyring(signing_keys: str | None) -> Keyring:
    given = {"signing_keys": signing_keys} if signing_keys else {}
    settings = Settings.only("signing_keys", **given)
    spec = settings.signing_keys.get_secret_value() if settings.signing_keys else None
    if not spec:
        raise ValueError("reconnect tokens need signing keys: set RESUME_SIGNING_KEYS")
    return Keyring.parse(spec)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    """``text`` decoded, only when it is exactly as `_b64` spells its bytes: the lenient
    decoder skips characters outside the alphabet and unused bits, so one token could
    otherwise be respelled many ways that all verify (ValueError then)."""
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(data) != text:
        raise ValueError("not canonical base64url")
    return data


def _mac(key: bytes, signed: str) -> bytes:
    return hmac.new(key, signed.encode(), hashlib.sha256).digest()


async def _now(store: Store, key: str) -> float:
    """The store's clock (`SessionInfo.read_at`), by which a token's expiry is set and
    checked: the hosts that issue and verify tokens may disagree by minutes. This host's
    clock for a store that does not say, or a key it does not hold."""
    info = await store.info(key)
    return info.read_at if info is not None and info.read_at is not None else time.time()


async def _conversation(store: Store, key: str, readers: Sequence[Codec]) -> tuple[str | None, str]:
    """The key's current conversation id and state (SnapshotNotFound if none), read as
    the workers read it: with the environment's keys, then with those given (the
    workers' in code) when the environment's do not verify it or decrypt it. Decoded on
    a worker thread: a long history would hold the loop every other session shares."""
    stored = await store.load(key)
    for codec in readers[:-1]:
        try:
            snap = await asyncio.to_thread(from_stored, codec, stored)
            return snap.meta.conversation, snap.state
        except SignatureMismatch:
            pass
    snap = await asyncio.to_thread(from_stored, readers[-1], stored)
    return snap.meta.conversation, snap.state


def _readers(store: Store, signing_keys: str | None, encryption_keys: str | None) -> list[Codec]:
    given = {"signing_keys": signing_keys, "encryption_keys": encryption_keys}
    keys = {name: value for name, value in given.items() if value}
    return [codec_for(store), codec_for(store, **keys)] if keys else [codec_for(store)]


async def issue_token(
    store: Store,
    key: str,
    *,
    ttl: float,
    signing_keys: str | None = None,
    encryption_keys: str | None = None,
) -> str:
    """A token for the conversation ``key`` holds now, valid for ``ttl`` seconds.
    Raises `SnapshotNotFound` when the key holds none, `TokenRefused` when it ended.
    ``encryption_keys``: the workers', where they are given in code (as ``signing_keys``)."""
    validate_key(key)
    if not math.isfinite(ttl):
        raise ValueError(f"a reconnect token's ttl must be a finite number of seconds, not {ttl}")
    kid, secret = _keyring(signing_keys).keys[0]
    codec = codec_for(store)  # the store's namespace, which the token binds
    readers = _readers(store, signing_keys, encryption_keys)
    conversation, state = await _conversation(store, key, readers)
    if state == "ended" or conversation is None:
        raise TokenRefused(f"session {key!r} holds no conversation a token can resume")
    payload = [codec.namespace, key, conversation, await _now(store, key) + ttl, kid]
    signed = f"{PREFIX}.{_b64(msgpack.packb(payload, use_bin_type=True))}"
    return f"{signed}.{_b64(_mac(secret, signed))}"


def _payload(token: str, keys: Keyring) -> list[Any]:
    if not isinstance(token, str) or len(token) > MAX_TOKEN or token.count(".") != 2:
        raise TokenRefused("reconnect token refused: not a token")
    signed, _, mac = token.rpartition(".")
    prefix, _, body = signed.partition(".")
    try:
        payload = msgpack.unpackb(_unb64(body), raw=False) if prefix == PREFIX else None
        given = _unb64(mac)
    except (ValueError, msgpack.UnpackException):
        payload = None
    if (
        not isinstance(payload, list)
        or len(payload) != 5
        or not all(isinstance(p, str) for p in (*payload[:3], payload[4]))
        or not isinstance(payload[3], (int, float))
    ):
        raise TokenRefused("reconnect token refused: malformed")
    secret = keys.get(payload[4])
    if secret is None or not hmac.compare_digest(_mac(secret, signed), given):
        raise TokenRefused("reconnect token refused: its signature does not verify (forged?)")
    return payload


async def verify_token(
    store: Store,
    token: str,
    *,
    signing_keys: str | None = None,
    encryption_keys: str | None = None,
) -> str:
    """The session key a valid token names; `TokenRefused` saying why otherwise
    (forged, expired, another namespace, the conversation ended, was replaced or is
    damaged). ``encryption_keys``: the workers', where they are given in code."""
    namespace, key, conversation, expires_at, _ = _payload(token, _keyring(signing_keys))
    key = str(key)
    codec = codec_for(store)
    if namespace != codec.namespace:
        raise TokenRefused(f"reconnect token for session {key!r} refused: another namespace")
    # NaN never compares
    if not math.isfinite(expires_at) or expires_at < await _now(store, key):
        raise TokenRefused(f"reconnect token for session {key!r} refused: it expired")
    try:
        current, state = await _conversation(
            store, key, _readers(store, signing_keys, encryption_keys)
        )
    except SnapshotNotFound:
        raise TokenRefused(
            f"reconnect token for session {key!r} refused: no conversation is stored"
        ) from None
    except SnapshotCorrupt as e:
        # which conversation it holds cannot be told: not resumed by a token, and left
        # as it is for `repair`
        raise TokenRefused(
            f"reconnect token for session {key!r} refused: its stored conversation is "
            f"damaged ({e}); repair it with `livekit-resume repair {key}`"
        ) from e
    if current != conversation or state == "ended":
        raise TokenRefused(
            f"reconnect token for session {key!r} refused: its conversation ended (revoked)"
        )
    return key
