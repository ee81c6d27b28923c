"""One validator for everything that arrives from the network: messages, settings, manifests, probes.

A rule is declared once, next to the field it guards, as a spec (Int, Float, Str, ...); `validate` applies a
spec to what a peer sent and returns the checked value, or raises SchemaError naming the field's path
("files[3].sha256") with a sentence. Pure: no I/O, standard library only (it ships into stock Blenders).

Every spec refuses what its type does not allow (a bool is no int, NaN no float); bounds, lengths, choices and
a spec's own check come after. A Record is a map with named fields (unknown keys are ignored: a newer peer may
add some) and rules over several fields; its `messages` say how a field's problem reads, a spec's `message`
overrides that for its field. Templates are str.format strings over: name (the field in the nearest record
with a template), path, value, what (the field's type, or its repr for a float), expected, low, high, choices,
count, record (the raw map), and what the caller passes as context.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

from .errors import ProtocolError

MISSING, TYPE, FINITE, RANGE, SHORT, LONG, CHOICE, FORM, RULE = (
    "missing", "type", "finite", "range", "short", "long", "choice", "form", "rule")


class SchemaError(ProtocolError):
    """Something a peer sent breaks its schema; `path` names the field ("" for the whole value)."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class _Invalid(Exception):
    """A problem on its way out of nested specs, gathering its path and the template that will word it."""

    def __init__(self, problem: str, spec: Spec | None, value: Any, **facts: Any) -> None:
        super().__init__(problem)
        self.problem = problem
        self.value = value
        self.facts = facts
        self.parts: list[str | int] = []
        self.template: str | None = None
        self.error: type[SchemaError] | None = None
        self.name = ""
        self.field_value: Any = None
        self.record: Any = None
        if spec is not None:
            self.facts.setdefault("expected", spec.expected)
            self.adopt(spec)

    def adopt(self, spec: Spec) -> None:
        """Take the spec's own wording and error class, unless a spec nearer the problem gave one."""
        if self.template is None:
            self.template = spec.template(self.problem)
        if self.error is None:
            self.error = spec.error


def _path(parts: Iterable[str | int]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


class Spec:
    """What one value may be. optional: the key may be absent; nullable: None is accepted as is;
    absent_if_none: None counts as an absent key (the record then leaves it to the default)."""

    expected = "a value"

    def __init__(self, *, optional: bool | None = None, nullable: bool = False, absent_if_none: bool = False,
                 check: Callable[[Any], Any] | None = None, message: str | Mapping[str, str] | None = None,
                 error: type[SchemaError] | None = None) -> None:
        self.optional = optional
        self.nullable = nullable
        self.absent_if_none = absent_if_none
        self.check_fn = check
        self.message = message
        self.error = error

    def but(self, **changes: Any) -> Spec:
        clone = copy.copy(self)
        clone.__dict__.update(changes)
        return clone

    def template(self, problem: str) -> str | None:
        if isinstance(self.message, Mapping):
            return self.message.get(problem)
        return self.message

    def check(self, value: Any) -> Any:
        if value is None and self.nullable:
            return None
        value = self._check(value)
        if self.check_fn is not None and self.check_fn(value) is False:
            raise _Invalid(FORM, self, value)
        return value

    def _check(self, value: Any) -> Any:
        return value


def _bounded(spec: Any, value: Any, size: float) -> None:
    if spec.low is not None and size < spec.low or spec.above is not None and size <= spec.above:
        raise _Invalid(RANGE, spec, value, low=spec.low if spec.above is None else spec.above, high=spec.high)
    if spec.high is not None and size > spec.high:
        raise _Invalid(RANGE, spec, value, low=spec.low if spec.above is None else spec.above, high=spec.high)


class Value(Spec):
    """Anything (but no NaN or infinity inside): for what only `check` can judge."""

    def _check(self, value: Any) -> Any:
        if not all_finite(value):
            raise _Invalid(FINITE, self, value)
        return value


class Bool(Spec):
    expected = "true or false"

    def _check(self, value: Any) -> Any:
        if not isinstance(value, bool):
            raise _Invalid(TYPE, self, value)
        return value


class Int(Spec):
    """A whole number (a bool is none), low <= n <= high."""

    expected = "a whole number"

    def __init__(self, low: int | None = None, high: int | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.low, self.high, self.above = low, high, None

    def _check(self, value: Any) -> Any:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Invalid(TYPE, self, value)
        _bounded(self, value, value)
        return value


class Float(Spec):
    """A finite number (an int will do), low <= x <= high, or above < x."""

    expected = "a number"

    def __init__(self, low: float | None = None, high: float | None = None, *, above: float | None = None,
                 **options: Any) -> None:
        super().__init__(**options)
        self.low, self.high, self.above = low, high, above

    def _check(self, value: Any) -> Any:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _Invalid(TYPE, self, value)
        if not math.isfinite(value):
            raise _Invalid(FINITE, self, value)
        _bounded(self, value, value)
        return value


class _Sized(Spec):
    kind: type | tuple[type, ...] = object

    def __init__(self, *, min_len: int = 0, max_len: int | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.min_len, self.max_len = min_len, max_len

    def _length(self, value: Any) -> None:
        if len(value) < self.min_len:
            raise _Invalid(SHORT, self, value, low=self.min_len, high=self.max_len, count=len(value))
        if self.max_len is not None and len(value) > self.max_len:
            raise _Invalid(LONG, self, value, low=self.min_len, high=self.max_len, count=len(value))

    def _check(self, value: Any) -> Any:
        if not isinstance(value, self.kind):
            raise _Invalid(TYPE, self, value)
        self._length(value)
        return value


class Bytes(_Sized):
    expected = "bytes"
    kind = bytes


class Str(_Sized):
    """Text of min_len..max_len characters; one of `choices`, matching `pattern`, printable if asked."""

    expected = "text"
    kind = str

    def __init__(self, *, choices: Iterable[str] | None = None, pattern: str | re.Pattern[str] | None = None,
                 printable: bool = False, **options: Any) -> None:
        super().__init__(**options)
        self.choices = None if choices is None else tuple(choices)
        self.pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
        self.printable = printable

    def _check(self, value: Any) -> Any:
        super()._check(value)
        if self.choices is not None and value not in self.choices:
            raise _Invalid(CHOICE, self, value, choices=", ".join(self.choices))
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise _Invalid(FORM, self, value)
        if self.printable and not value.isprintable():
            raise _Invalid(FORM, self, value)
        return value


class ListOf(_Sized):
    """A list (or a tuple, if tuple_ok) of min_len..max_len items, each checked by `item`."""

    expected = "a list"

    def __init__(self, item: Spec, *, tuple_ok: bool = False, **options: Any) -> None:
        super().__init__(**options)
        self.item = item
        self.kind = (list, tuple) if tuple_ok else list

    def _check(self, value: Any) -> Any:
        super()._check(value)
        item, checked = self.item, []
        for index, element in enumerate(value):
            try:
                checked.append(item.check(element))
            except _Invalid as invalid:
                invalid.parts.insert(0, index)
                invalid.adopt(self)
                raise
        return checked


class OpenMap(Spec):
    """A map with text keys whose content the schema leaves open (a probe's scene, a status): what is in it is
    read by other code later, so no NaN or infinity may hide anywhere inside."""

    expected = "a map"

    def _check(self, value: Any) -> Any:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _Invalid(TYPE, self, value)
        if not all_finite(value):
            raise _Invalid(FINITE, self, value)
        return value


@dataclasses.dataclass(frozen=True)
class Rule:
    """A rule over several fields of a record, checked once they all passed: `test` gets the checked values,
    `message` is formatted with them (and the context)."""

    test: Callable[[dict[str, Any]], bool]
    message: str


class Record(Spec):
    """A map with named fields (each a spec), and rules over several of them. Returns the checked values of
    the fields present (an absent optional field is left out, for the dataclass default)."""

    expected = "a map"

    def __init__(self, fields: Mapping[str, Spec], *, messages: Mapping[str, str] | None = None,
                 rules: Iterable[Rule] = (), **options: Any) -> None:
        super().__init__(**options)
        self.fields = dict(fields)
        self.messages = dict(messages or {})
        self.rules = tuple(rules)

    def _check(self, value: Any) -> Any:
        if not isinstance(value, dict):
            raise _Invalid(TYPE, self, value)
        checked: dict[str, Any] = {}
        for name, spec in self.fields.items():
            raw = value.get(name)
            if raw is None and (name not in value or spec.absent_if_none):
                if spec.optional:
                    continue
                raw, problem = None, _Invalid(MISSING, spec, None)
            else:
                try:
                    checked[name] = spec.check(raw)
                    continue
                except _Invalid as invalid:
                    problem = invalid
            problem.parts.insert(0, name)
            if problem.error is None:
                problem.error = spec.error
            if problem.record is None:  # no record nearer the problem worded it: this one may
                if problem.template is None:
                    problem.template = spec.template(problem.problem)
                if problem.template is None:
                    problem.template = self.messages.get(problem.problem)
                if problem.template is not None:
                    problem.name, problem.field_value, problem.record = name, raw, value
            raise problem
        for rule in self.rules:
            if not rule.test(checked):
                problem = _Invalid(RULE, None, value)
                problem.template, problem.record, problem.facts = rule.message, value, dict(checked)
                raise problem
        return checked


def all_finite(value: Any) -> bool:
    """No NaN or infinity anywhere inside a list or map. Iterative: a deeply nested message cannot exhaust
    the stack."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return False
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return True


def _what(value: Any, problem: str) -> str:
    what = repr(value) if isinstance(value, float) else type(value).__name__
    if isinstance(value, (dict, list)) and (problem == FINITE or not all_finite(value)):
        what += " holding a number that is not finite"
    return what


def _default_sentence(invalid: _Invalid, path: str) -> str:
    where = path or "the value"
    problem, facts, value = invalid.problem, invalid.facts, invalid.value
    if problem == MISSING:
        return f"{where} is missing"
    if problem == FINITE:
        return f"{where} is not a finite number" + ("" if isinstance(value, float) else " (somewhere inside)")
    if problem in (RANGE, SHORT, LONG):
        low, high = facts.get("low"), facts.get("high")
        size = f"{facts['count']} long" if "count" in facts else repr(value)
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        return f"{where} must be {bounds}{' long' if 'count' in facts else ''}, not {size}"
    if problem == CHOICE:
        return f"{where} must be one of {facts['choices']}, not {value!r}"
    if problem == FORM:
        return f"{where} is not in the form it must have: {value!r}"[:300]
    return f"{where} must be {facts.get('expected', 'something else')}, not {type(value).__name__}"


def validate(spec: Spec, value: Any, *, error: type[SchemaError] = SchemaError, **context: Any) -> Any:
    """The value checked by `spec` (records come back as a dict of their checked fields); raises SchemaError
    (or `error`, or the class a spec on the way names) with the sentence its templates make."""
    try:
        return spec.check(value)
    except _Invalid as invalid:
        path = _path(invalid.parts)
        if invalid.template is None:
            raise (invalid.error or error)(_default_sentence(invalid, path), path) from None
        facts = {"name": invalid.name, "path": path, "value": invalid.value, "expected": "", "low": None,
                 "high": None, "choices": "", "count": None, "record": invalid.record,
                 "what": _what(invalid.field_value if invalid.name else invalid.value, invalid.problem),
                 **context, **invalid.facts}
        raise (invalid.error or error)(invalid.template.format(**facts), path) from None


# --- specs from dataclasses ---------------------------------------------------------------------------

_PLAIN: dict[Any, Callable[[], Spec]] = {bool: Bool, int: Int, float: Float, str: Str, bytes: Bytes, dict: OpenMap}


def spec_of(hint: Any) -> Spec:
    """The spec a type hint means: Annotated[T, spec] is that spec; T | None is T's, nullable; plain int,
    float, str, bool, bytes, dict and list[T] are the types themselves."""
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        inner, spec = typing.get_args(hint)[:2]
        return spec.but(nullable=True) if _nullable(inner) else spec
    if origin in (Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported schema type {hint!r}")
        return spec_of(args[0]).but(nullable=True)
    if origin is list:
        (item,) = typing.get_args(hint)
        return ListOf(spec_of(item))
    if origin is dict:
        return OpenMap()
    if hint in _PLAIN:
        return _PLAIN[hint]()
    raise TypeError(f"unsupported schema type {hint!r}")


def _nullable(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType) and type(None) in typing.get_args(hint)


def record_of(cls: type, **options: Any) -> Record:
    """The Record of a dataclass: each field's spec from its type hint; a field with a default is optional
    (unless its spec says otherwise)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields: dict[str, Spec] = {}
    for field in dataclasses.fields(cls):
        spec = spec_of(hints[field.name])
        if spec.optional is None:
            has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
            spec = spec.but(optional=has_default)
        fields[field.name] = spec
    return Record(fields, **options)
