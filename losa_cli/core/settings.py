"""Settings as data: YAML values checked against a config dataclass's field types.

One typed coercion serves every place settings arrive as text -- a ``losa run`` recipe, its
``section.key=value`` overrides, and ``losa recover --config FILE key=value`` -- so a setting means
the same wherever it is written, and every wrong key or type is reported together.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import fields
from enum import Enum
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from .errors import ConfigError

#: a recipe or settings file is a few dozen settings; anything far larger is a mistake (or hostile)
MAX_SETTINGS_BYTES = 1 << 20
#: how much of a wrong value, and of one problem, a message echoes (a hostile file made a 52 MB line)
SHOWN_CHARS = 60
PROBLEM_CHARS = 400
SHOWN_PROBLEMS = 20


class DuplicateKey(yaml.YAMLError):
    """A mapping names a key twice: YAML would silently keep the second."""

    def __init__(self, key: Any, line: int) -> None:
        super().__init__(f"line {line}: {shown(key)} is given twice (the second would silently replace the first)")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``2:4`` as the base-60 integer 124 and ``1e-3`` as a string; not here.  A key given
    twice in one mapping is an error, not a silent override (merge keys ``<<`` may still be overridden)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(_FLOAT, re.compile(
    r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def yaml_value(text: str) -> Any:
    """One YAML value (overrides): ``40`` -> 40, ``null`` -> None, ``2:4`` -> '2:4', ``1e-3`` -> 0.001."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def shown(value: Any) -> str:
    """``repr(value)``, clipped: what a problem message echoes of a value the user gave."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text):,} characters)"


def bounded(problems: list[str]) -> list[str]:
    """At most ``SHOWN_PROBLEMS`` problems of at most ``PROBLEM_CHARS`` characters each, so one error line stays
    readable whatever the file held."""
    clipped = [p if len(p) <= PROBLEM_CHARS else p[:PROBLEM_CHARS] + "..." for p in problems[:SHOWN_PROBLEMS]]
    if len(problems) > SHOWN_PROBLEMS:
        clipped.append(f"and {len(problems) - SHOWN_PROBLEMS} more")
    return clipped


def read_yaml_mapping(path: str, what: str) -> dict[str, Any]:
    """A YAML file that holds a mapping (an empty file is an empty mapping); ``what`` names it in errors."""
    file = Path(path)
    try:
        if not file.is_file():  # a folder, or a device or pipe that could block or never end
            raise ConfigError(f"the {what} {path} is not a regular file; give a YAML file")
        if file.stat().st_size > MAX_SETTINGS_BYTES:
            raise ConfigError(f"the {what} {path} is {file.stat().st_size:,} bytes; a {what} is a few settings "
                              f"(at most {MAX_SETTINGS_BYTES:,} bytes): is it the right file?")
        data = yaml.load(file.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - a BOM is skipped
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; a {what} is a YAML file") from None
    except DuplicateKey as exc:
        raise ConfigError(f"{path}: {exc}; keep one") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())[:PROBLEM_CHARS]}") from None
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply to be a {what}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} is a mapping of settings, got {type(data).__name__}")
    return data


def split_override(text: str) -> tuple[str, Any] | str:
    """``key=value`` -> (key, the value read as YAML); a problem string when it is not one."""
    name, sep, value_text = text.partition("=")
    name = name.strip()
    if not sep or not name:
        return f"override {shown(text)} is not key=value (e.g. recover.total_steps=40 or prune=null)"
    try:
        return name, yaml_value(value_text)
    except DuplicateKey as exc:
        return f"override {shown(text)}: {exc}"
    except (yaml.YAMLError, RecursionError):
        return f"override {shown(text)}: the value is not valid YAML"


def type_name(hint: Any) -> str:
    """How a field's type reads in a problem message."""
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if hint in names:
        return names[hint]
    if isinstance(hint, type) and issubclass(hint, Enum):
        return f"one of {', '.join(str(c.value) for c in hint)}"
    if get_origin(hint) is list:
        return f"a list of {type_name(get_args(hint)[0]).removeprefix('an ').removeprefix('a ')}s"
    return " or ".join(type_name(a) for a in get_args(hint))


def coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """(ok, value) for a YAML value against a dataclass field's type; ints are accepted as floats.

    A choice (an enum) accepts any string here: the config itself reports an unknown one, with the
    list of choices.  A list of choices also accepts a comma-separated string (``engines: a,b``)."""
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in get_args(hint):
            ok, converted = coerce(value, option)
            if ok:
                return True, converted
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str or (isinstance(hint, type) and issubclass(hint, Enum)):
        return isinstance(value, str), value
    if origin is list:
        item_hint = get_args(hint)[0]
        if isinstance(value, str) and isinstance(item_hint, type) and issubclass(item_hint, Enum):
            return True, value
        if not isinstance(value, list):
            return False, value
        converted = []
        for item in value:
            ok, item = coerce(item, item_hint)
            if not ok:
                return False, value
            converted.append(item)
        return True, converted
    return False, value


def field_types(cls: type) -> dict[str, Any]:
    """A config dataclass's fields and their resolved types."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def unknown_key(where: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known))}"
    return f"{where}: unknown key {shown(name)}{hint}"


def typed_settings(raw: dict[str, Any], allowed: dict[str, Any], where: str, managed: dict[str, str],
                   problems: list[str], place: str = "in a recipe") -> dict[str, Any]:
    """The entries of ``raw`` whose keys ``allowed`` names, coerced to its types; every unknown key, key that
    cannot be set ``place`` (``managed``: key -> why) and wrong type is added to ``problems`` (as ``where.key``)."""
    parsed = {}
    for name, value in raw.items():
        name = str(name)
        if name in managed:
            problems.append(f"{where}.{name} cannot be set {place}: {managed[name]}")
        elif name not in allowed:
            problems.append(unknown_key(where, name, list(allowed)))
        else:
            ok, converted = coerce(value, allowed[name])
            if ok:
                parsed[name] = converted
            else:
                problems.append(f"{where}.{name} must be {type_name(allowed[name])}, got {shown(value)}")
    return parsed
