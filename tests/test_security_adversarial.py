"""An adversarial pass over keys, keyrings and reconnect tokens: what an attacker who
reads logs or rewrites a token can get, and what a misconfigured keyring does."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import pytest

import livekit_resume as lr
from livekit_resume.settings import Settings
from livekit_resume.snapshot.frame import Keyring
from livekit_resume.stores.base import Store
from tests.test_hooks import KEY
from tests.test_tokens import conversation

SECRET = b"k" * 32
OTHER_SECRET = b"o" * 32
SIGN = "t1:" + base64.b64encode(SECRET).decode()


def test_a_keyrings_repr_and_str_never_show_its_key_bytes() -> None:
    ring = Keyring.parse(SIGN + ",t0:" + base64.b64encode(OTHER_SECRET).decode())
    for shown in (repr(ring), str(ring), repr([ring]), f"{ring!r}"):
        assert "kkkk" not in shown and "oooo" not in shown
        assert base64.b64encode(SECRET).decode() not in shown
        assert "t1" in shown and "t0" in shown  # the key ids are no secret


def test_a_keyring_naming_one_key_id_twice_is_refused_without_showing_a_key() -> None:
    # "t1:<old>,t1:<new>": the old key would silently shadow the new one (every frame
    # signed with the new key by another worker is refused), or the reverse
    twice = SIGN + ",t1:" + base64.b64encode(OTHER_SECRET).decode()
    with pytest.raises(ValueError, match="key id 't1' is given twice") as err:
        Keyring.parse(twice)
    assert base64.b64encode(OTHER_SECRET).decode() not in str(err.value)
    with pytest.raises(ValueError, match="RESUME_SIGNING_KEYS") as err:
        Settings.only("signing_keys", signing_keys=twice).codec()
    assert base64.b64encode(SECRET).decode() not in str(err.value)
    with pytest.raises(ValueError, match="RESUME_ENCRYPTION_KEYS"):
        Settings.only("encryption_keys", encryption_keys=twice).codec()


@pytest.fixture
async def store(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Store]:
    monkeypatch.setenv("RESUME_SIGNING_KEYS", SIGN)
    s: Store = lr.open_store("memory://")
    yield s
    await s.aclose()


async def test_a_token_is_accepted_only_in_its_one_exact_spelling(store: Store) -> None:
    # A token is a bearer secret that a back end may log, dedupe or revoke by its text:
    # a second spelling of the same token that verifies escapes all of that.
    await conversation(store)
    token = await lr.issue_token(store, KEY, ttl=60)
    assert await lr.verify_token(store, token) == KEY
    head, body, mac = token.split(".")
    respelled = [
        f"{head}.{body}.{mac}!!",  # junk after the MAC
        f"{head}.{body}.{mac[:5]} {mac[5:]}",  # a space inside it
        f"{head}.{body}.{mac}=",  # padding the issuer never writes
        f"{head}.{body}.{mac[:-1]}{chr(ord(mac[-1]) ^ 1)}",  # other unused low bits
        f"{head}.{body}.{mac.replace('-', '+').replace('_', '/')}",  # the other alphabet
        f"{head}.{body}.{mac}\n",
    ]
    for other in respelled:
        if other == token:
            continue
        with pytest.raises(lr.TokenRefused):
            await lr.verify_token(store, other)


@pytest.mark.parametrize(
    "secret",
    [
        base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode(),  # base64url (`-`, `_`)
        base64.b64encode(b"z" * 32).decode().rstrip("="),  # padding stripped
        base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode().rstrip("="),  # token_urlsafe
        (b"\xab" * 32).hex(),  # hex
    ],
)
def test_a_key_written_before_its_id_is_never_shown_whatever_its_alphabet(secret: str) -> None:
    # "SECRET:kid" (the two swapped): the part read as the key id is the secret
    for setting in ("signing_keys", "encryption_keys"):
        with pytest.raises(ValueError) as err:
            Settings.only(setting, **{setting: f"{secret}:k1"}).codec()
        assert secret not in str(err.value) and secret[:16] not in str(err.value)
    with pytest.raises(ValueError) as err:
        Keyring.parse(f"k0:{base64.b64encode(SECRET).decode()},{secret}:k1")
    assert secret[:16] not in str(err.value)


def test_a_short_key_id_is_still_named_in_a_keyring_error() -> None:
    with pytest.raises(ValueError, match="'k2025b'"):
        Keyring.parse("k2025b:not-base64")


@pytest.mark.parametrize("kid", ["k1 ", "k 1", "k1\t", "k1\n", "k1\x00", "k1\u200b"])
def test_a_key_id_with_spaces_or_unprintable_characters_is_refused(kid: str) -> None:
    # "k1 :KEY" wrote frames under the id "k1 ", which a reader given "k1:KEY" does not
    # hold: every restore then failed naming a key that looks configured
    spec = f"{kid}:{base64.b64encode(SECRET).decode()}"
    with pytest.raises(ValueError, match="key id") as err:
        Keyring.parse(spec)
    assert base64.b64encode(SECRET).decode() not in str(err.value)


def test_a_key_written_before_its_id_with_a_space_is_not_shown() -> None:
    secret = base64.b64encode(OTHER_SECRET).decode()
    for spec in (f"{secret} :k1", f"{secret}\t:k1", f"{secret[:20]} {secret[20:]}:k1"):
        with pytest.raises(ValueError) as err:
            Keyring.parse(spec)
        assert secret[:16] not in str(err.value), err.value
