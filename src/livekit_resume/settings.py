"""`Settings`: the configuration code, command line and deployments share, typed, read
from the environment in this one place.

| field | environment | meaning |
| --- | --- | --- |
| ``store`` | ``RESUME_STORE`` | the store URL (default: `DEFAULT_STORE_URL`) |
| ``namespace`` | ``RESUME_NAMESPACE`` | key prefix, one per tenant or deployment |
| ``ttl`` | ``RESUME_TTL`` | seconds a session survives without writes |
| ``keep`` | ``RESUME_KEEP`` | versions each session keeps loadable |
| ``signing_keys`` | ``RESUME_SIGNING_KEYS`` | ``kid:base64key[,…]``, the first signs |
| ``encryption_keys`` | ``RESUME_ENCRYPTION_KEYS`` | same form, AES-GCM at rest |
| ``allow_plaintext`` | ``RESUME_ALLOW_PLAINTEXT`` | read unencrypted frames although
  encryption keys are set: only while migrating a store to encryption |
| ``allow_unbound`` | ``RESUME_ALLOW_UNBOUND`` | read heads written before format 3 (no
  version binding, no seal); default on, turn off once every session was rewritten |
| ``sentinel_password`` | ``RESUME_SENTINEL_PASSWORD`` | the password of the Sentinels of
  a ``redis+sentinel://`` store, when they require one (the URL's authenticates to Redis) |

Build it once where it is needed with `Settings.load`, keyword options winning over
the environment (an option given is never read from the environment at all); an empty
variable counts as unset. Keys are secrets: they never appear in ``repr`` or ``str``.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterator
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from . import redact
from .stores.base import validate_ttl

if TYPE_CHECKING:
    from .snapshot.codec import Codec

__all__ = ["CODEC_SETTINGS", "DEFAULT_STORE_URL", "ENV_PREFIX", "Settings"]

# The embedded default: a file in the working directory, nothing to install or run.
DEFAULT_STORE_URL = "sqlite:///resume.db"
ENV_PREFIX = "RESUME_"
# What a codec reads: ``Settings.only(*CODEC_SETTINGS).codec()`` is the codec every
# worker and the command line must agree on (the namespace is bound into every frame).
CODEC_SETTINGS = (
    "namespace",
    "signing_keys",
    "encryption_keys",
    "allow_plaintext",
    "allow_unbound",
)


class Settings(BaseSettings):
    """livekit-resume's settings (see the module docstring for each field)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_ignore_empty=True,  # RESUME_TTL= means "not set", as it always has
        extra="ignore",  # other RESUME_* variables (the tests' own) are not settings
        frozen=True,
    )

    store: str = DEFAULT_STORE_URL
    namespace: str | None = None
    ttl: float | None = None
    keep: int | None = None
    signing_keys: SecretStr | None = None
    encryption_keys: SecretStr | None = None
    allow_plaintext: bool = False
    allow_unbound: bool = True
    sentinel_password: SecretStr | None = None

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # a repr is logged, printed, kept in a traceback's locals: never a password
        for name, value in super().__repr_args__():
            yield name, redact.url(value) if name == "store" and isinstance(value, str) else value

    @field_validator("ttl")
    @classmethod
    def _finite_ttl(cls, ttl: float | None) -> float | None:
        return validate_ttl(ttl)

    @field_validator("keep")
    @classmethod
    def _positive_keep(cls, keep: int | None) -> int | None:
        if keep is not None and keep < 1:
            raise ValueError("keep must be at least 1")
        return keep

    @classmethod
    def load(cls, **options: Any) -> Settings:
        """The environment's settings, each of ``options`` replacing its variable.

        A bad value raises `ValueError` in one line naming the variable (or option) and
        the value, e.g. ``RESUME_TTL='abc' is not …; fix or unset it``.
        """
        key = _cache_key(cls, options)
        settings = _LOADED.get(key) if key is not None else None
        if settings is not None:
            return settings
        try:
            settings = cls(**options)
        except ValidationError as exc:
            raise ValueError(_one_line(exc, options)) from None
        if key is not None:
            if len(_LOADED) >= _LOADED_MAX:
                _LOADED.clear()
            _LOADED[key] = settings
        return settings

    @classmethod
    def only(cls, *names: str, **options: Any) -> Settings:
        """Like `load`, reading only the variables of ``names``: the other fields keep
        their defaults, so a call site that needs the keys is never refused for a bad
        ``RESUME_TTL`` it does not use."""
        unknown = set(names) - set(cls.model_fields)
        if unknown:
            raise ValueError(f"no such settings: {', '.join(sorted(unknown))}")
        skipped = {
            name: field.default
            for name, field in cls.model_fields.items()
            if name not in names and name not in options
        }
        return cls.load(**skipped, **options)

    def store_options(self) -> dict[str, Any]:
        """The options `open_store` passes a backend: those that are set."""
        values = {"namespace": self.namespace, "ttl": self.ttl, "keep": self.keep}
        if self.store.lower().startswith("redis+sentinel:"):  # no other backend takes it
            values["sentinel_password"] = _secret(self.sentinel_password)
        return {name: value for name, value in values.items() if value is not None}

    def codec(self, **options: Any) -> Codec:
        """A `Codec` with these keys, namespace and migration flags; ``options``
        (``max_frame``, ``namespace``…) go to the codec and win."""
        from .snapshot.codec import Codec

        signing, encryption = _secret(self.signing_keys), _secret(self.encryption_keys)
        flags: dict[str, Any] = {
            "namespace": self.namespace,
            "allow_plaintext": self.allow_plaintext,
            "allow_unbound": self.allow_unbound,
        }
        try:
            return Codec(signing_keys=signing, encryption_keys=encryption, **{**flags, **options})
        except ValueError as exc:
            # A malformed key names itself in the codec's message: a key given without
            # its ``kid:`` is the secret itself. Nothing of a key is ever shown.
            message = redact.secrets(str(exc), (signing, encryption))
            where = _refused_keys(signing, encryption)
            raise ValueError(f"{where}: {message}" if where else message) from None


# Settings already read, by what they were read from: pydantic-settings takes about half
# a millisecond to build one (every ResumableSession reads its codec's), a lookup a few
# µs. Frozen, so shared safely; the key holds every variable that could be read, so a
# change is seen.
_LOADED: dict[Hashable, Settings] = {}
_LOADED_MAX = 64


def _cache_key(cls: type[Settings], options: dict[str, Any]) -> Hashable | None:
    """What `Settings.load` reads: the class, ``options`` and every ``RESUME_*``
    variable (names match case-insensitively); None when an option is unhashable."""
    prefix = ENV_PREFIX.lower()
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.lower().startswith(prefix)))
    key = (cls, tuple(sorted(options.items())), env)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def _refused_keys(signing: str | None, encryption: str | None) -> str | None:
    """Which setting holds the key the codec refused; None when the keys are fine."""
    from .snapshot.codec import Codec

    try:
        Codec(signing_keys=signing)
    except ValueError:
        return f"{ENV_PREFIX}SIGNING_KEYS"
    try:
        Codec(encryption_keys=encryption)
    except ValueError:
        return f"{ENV_PREFIX}ENCRYPTION_KEYS"
    return None


_TTL_RULE = "is not a finite number of seconds >= 0.001 (the session TTL)"


def _one_line(exc: ValidationError, options: dict[str, Any]) -> str:
    """The first error of ``exc`` as one line: which variable or option, which value."""
    error = exc.errors(include_url=False)[0]
    name = str(error["loc"][0]) if error["loc"] else "?"
    shown = "(hidden)" if name.endswith("_keys") else repr(error.get("input"))
    if name in options:
        return f"{name}={shown}: {error['msg']}"
    rule = _TTL_RULE if name == "ttl" else f"is invalid ({error['msg']})"
    return f"{ENV_PREFIX}{name.upper()}={shown} {rule}; fix or unset it"
