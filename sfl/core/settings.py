"""One typed machinery for settings: each key's type, default, allowed values and meaning.

The federation's configuration (:mod:`sfl.core.config`, context ``sfl``) and the stack's own
settings (:mod:`sfl.core.deployment`, context ``sfl_infra``) are frozen dataclasses over
:class:`Settings`. A value is checked when a record is built, whether it came from
``cdk.json``, a Lambda's environment, a command line's ``--set`` or a runtime config record,
and a bad one fails with one wording: the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class Check(Protocol):
    """What values a key allows, and how messages and docs say it."""

    def test(self, value: Any) -> bool: ...

    def wording(self, kind: type) -> str: ...


@dataclass(frozen=True)
class Allowed:
    """Any predicate, with its wording (``"'' or an e-mail address"``)."""

    predicate: Callable[[Any], bool]
    text: str

    def test(self, value: Any) -> bool:
        return self.predicate(value)

    def wording(self, kind: type) -> str:
        return self.text


@dataclass(frozen=True)
class Range:
    """A closed range; worded as integers for an ``int`` key, as numbers otherwise."""

    lo: float
    hi: float

    def test(self, value: Any) -> bool:
        return bool(self.lo <= value <= self.hi)

    def wording(self, kind: type) -> str:
        if kind is int:
            return f"an integer from {int(self.lo)} to {int(self.hi)}"
        return f"a number from {self.lo:g} to {self.hi:g}"


@dataclass(frozen=True)
class OneOf:
    """One of a few fixed values."""

    values: tuple[Any, ...]

    def test(self, value: Any) -> bool:
        return value in self.values

    def wording(self, kind: type) -> str:
        return f"one of {', '.join(map(str, self.values))}"


ANY_BOOL = Allowed(lambda v: True, "true or false")

_SETTING = "sfl.setting"


@dataclass(frozen=True)
class Key:
    """One key of a settings class, resolved: its name, type, check and meaning."""

    name: str
    kind: type
    check: Check
    doc: str
    field: dataclasses.Field[Any]

    @property
    def allowed(self) -> str:
        return self.check.wording(self.kind)

    def default(self) -> Any:
        if self.field.default_factory is not dataclasses.MISSING:
            return self.field.default_factory()
        return self.field.default


def setting(
    default: Any = dataclasses.MISSING,
    *,
    allowed: Check,
    doc: str,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A settings field: its default (or ``default_factory``), what it allows, one line of
    meaning (shown by ``sfl config`` and the docs)."""
    return dataclasses.field(
        default=default,
        default_factory=default_factory,
        metadata={_SETTING: (allowed, doc)},
    )


_KEYS_OF: dict[type, dict[str, Key]] = {}  # each settings class -> its keys, resolved once


def _kind_of(hint: Any) -> type:
    origin = typing.get_origin(hint) or hint
    if origin not in (str, int, float, bool, dict):
        raise TypeError(f"a setting is a str, int, float, bool or dict, not {hint!r}")
    return typing.cast(type, origin)


_S = TypeVar("_S", bound="Settings")  # devices run Python 3.10: no Self type


class Settings:
    """Base of a frozen dataclass of settings: checked when built, read from a mapping or
    from text, described for help and docs. A subclass adds checks across keys in
    ``check_together``."""

    #: How messages name a key: ``'lr'`` when empty, ``sfl_infra.schedule_minutes`` otherwise.
    namespace: ClassVar[str] = ""

    # --- the keys ------------------------------------------------------------------------

    @classmethod
    def key_specs(cls) -> dict[str, Key]:
        """Every key of this class, in declaration order."""
        found = _KEYS_OF.get(cls)
        if found is None:
            hints = typing.get_type_hints(cls)
            found = {}
            for f in dataclasses.fields(cls):  # type: ignore[arg-type]
                check, doc = f.metadata[_SETTING]
                found[f.name] = Key(f.name, _kind_of(hints[f.name]), check, doc, f)
            _KEYS_OF[cls] = found
        return found

    @classmethod
    def label(cls, name: str) -> str:
        return f"{cls.namespace}.{name}" if cls.namespace else repr(name)

    @classmethod
    def refuse_unknown(cls, names: Iterable[str], *, source: str) -> None:
        """Raise ``ConfigError`` naming every key of ``names`` this class does not have."""
        known = cls.key_specs()
        unknown = sorted(set(names) - set(known))
        if not unknown:
            return
        guesses = {
            name: close[0]
            for name in unknown
            if (close := difflib.get_close_matches(name, list(known), n=1, cutoff=0.6))
        }
        hints = [f"did you mean {g!r} for {n!r}?" for n, g in guesses.items()]
        if len(guesses) < len(unknown):
            hints.append(f"known keys: {', '.join(sorted(known))}")
        hint = "; ".join(hints)
        raise ConfigError(
            f"{source}: unknown config key(s) {', '.join(map(repr, unknown))}; {hint}"
        )

    # --- checks --------------------------------------------------------------------------

    def __post_init__(self) -> None:
        for key in self.key_specs().values():
            object.__setattr__(self, key.name, self._checked(key, getattr(self, key.name)))
        self.check_together()

    def check_together(self) -> None:
        """Checks across keys (a soft deadline before the hard one); none by default."""

    @classmethod
    def _checked(cls, key: Key, value: Any) -> Any:
        kind = key.kind
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        # bool is an int subclass: a flag must be a real bool, a number never a bool.
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ConfigError(
                f"config key {cls.label(key.name)}: {value!r} is not a {kind.__name__}; "
                f"allowed: {key.allowed}"
            )
        if not key.check.test(value):
            raise ConfigError(
                f"config key {cls.label(key.name)}: {value!r} is not allowed; "
                f"allowed: {key.allowed}"
            )
        return value

    # --- sources -------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls: type[_S], values: Mapping[str, Any], *, source: str = "config") -> _S:
        """Build from typed values (a ``cdk.json`` context, a JSON record); unknown keys are
        errors."""
        cls.refuse_unknown(values, source=source)
        return cls(**dict(values))

    @classmethod
    def parse_value(cls, name: str, raw: str, *, where: str) -> Any:
        """One key's value given as text (``--set``, an environment variable), as its type;
        whether it is allowed is checked when a record is built from it."""
        key = cls.key_specs()[name]
        try:
            if key.kind is bool:
                if raw.strip().lower() not in ("true", "false"):
                    raise ValueError(raw)
                return raw.strip().lower() == "true"
            if key.kind is dict:
                return json.loads(raw)
            return key.kind(raw)
        except ValueError as e:
            raise ConfigError(
                f"config key {cls.label(name)} ({where}): {raw!r} is not a "
                f"{key.kind.__name__}; allowed: {key.allowed}"
            ) from e

    @classmethod
    def parse_text(cls, values: Mapping[str, str], *, source: str) -> dict[str, Any]:
        """Keys given as text (``KEY=VALUE`` on a command line), each as its type."""
        cls.refuse_unknown(values, source=source)
        return {k: cls.parse_value(k, v, where=source) for k, v in values.items()}

    def with_overrides(self: _S, values: Mapping[str, str], *, source: str = "--set") -> _S:
        """This record with some keys given as text (``KEY=VALUE`` on a command line)."""
        return self.replace(**self.parse_text(values, source=source))

    # --- sinks ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload, no-any-return]

    def replace(self: _S, **changes: Any) -> _S:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    @classmethod
    def describe(cls) -> list[tuple[str, str, str, str]]:
        """(key, default, allowed, meaning) for every key, for ``sfl config`` and the docs."""
        return [(k.name, repr(k.default()), k.allowed, k.doc) for k in cls.key_specs().values()]
