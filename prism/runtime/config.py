"""Build a frozen config dataclass from the command line and the environment.

Every service has one frozen dataclass config; each field carries its help text in
``field(metadata={"help": ...})`` and the class validates itself in ``__post_init__`` (raise
`ConfigError` naming the field, or use `check`). `__main__` then does::

    config = config_from_cli(EncoderConfig, env_prefix="PRISM_ENCODER")

which generates ``--field-name`` options (defaults overridable by ``PRISM_ENCODER_FIELD_NAME``),
parses ``sys.argv`` and constructs the config, turning validation errors into a clean argparse
error (exit status 2) that names the option.

Supported field types: ``int``, ``float``, ``str``, ``bool`` (``--flag/--no-flag``; env
``1/0/true/false/yes/no/on/off``), ``pathlib.Path``, ``tuple[T, ...]`` of those scalars
(comma-separated), ``Literal[...]`` (choices), ``X | None`` (an empty value or ``none`` means
None) and nested dataclasses, whose fields are flattened into the same option namespace (a
`ServerConfig` inside a stage config gives ``--port``, ``--host``... and ``PREFIX_PORT``...).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "ConfigError",
    "add_dataclass_arguments",
    "check",
    "config_from_cli",
    "dataclass_from_args",
]

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NONE = {"", "none", "null"}
_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A configuration value is invalid. `field` is the dataclass field's name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def check(condition: bool, field: str, message: str) -> None:
    """Raises `ConfigError(field, message)` unless `condition` holds (for ``__post_init__``)."""
    if not condition:
        raise ConfigError(field, message)


# ---------------------------------------------------------------------------- type handling


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) for ``X | None`` / ``Optional[X]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
        raise TypeError(f"unsupported union type {tp!r}")
    return tp, False


def _scalar_parser(tp: Any) -> Callable[[str], Any]:
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str, Path):
        def parse(text: str, _tp: Any = tp) -> Any:
            try:
                return _tp(text.strip() if _tp is not str else text)
            except ValueError:
                raise ValueError(f"expected {_tp.__name__}, got {text!r}") from None
        return parse
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)

        def parse_literal(text: str) -> Any:
            for choice in choices:
                if str(choice) == text:
                    return choice
            raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {text!r}")
        return parse_literal
    raise TypeError(f"unsupported config field type {tp!r}")


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected a boolean (1/0, true/false, yes/no, on/off), got {text!r}")


def _value_parser(tp: Any) -> Callable[[str], Any]:
    """A str → value converter for a (non-dataclass) field type."""
    inner, optional = _strip_optional(tp)
    if typing.get_origin(inner) is tuple:
        args = typing.get_args(inner)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"only tuple[T, ...] is supported, got {inner!r}")
        elem = _scalar_parser(args[0])

        def parse_tuple(text: str) -> tuple[Any, ...]:
            return tuple(elem(part.strip()) for part in text.split(",") if part.strip())
        base: Callable[[str], Any] = parse_tuple
    else:
        base = _scalar_parser(inner)
    if not optional:
        return base

    def parse_optional(text: str) -> Any:
        return None if text.strip().lower() in _NONE else base(text)
    return parse_optional


def _argparse_type(parse: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = name  # argparse names the type in some messages
    return convert


def _format_default(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "(empty)"
    if value is None:
        return "none"
    return str(value)


# ---------------------------------------------------------------------------- public API


@dataclasses.dataclass(frozen=True)
class _Option:
    path: tuple[str, ...]  # field names from the outer dataclass down to this field
    flag: str
    dest: str
    env: str


def _options_attr(cls: type) -> str:
    return f"_prism_config_options_{cls.__module__}_{cls.__qualname__}".replace(".", "_")


def add_dataclass_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    env_prefix: str,
    *,
    environ: Mapping[str, str] | None = None,
    title: str | None = None,
) -> argparse.ArgumentParser:
    """Adds one ``--field-name`` option per field of the dataclass `cls` to `parser`.

    Args:
        parser: the parser to extend.
        cls: a dataclass; nested dataclass fields are flattened (see the module docstring).
        env_prefix: environment variables ``{env_prefix}_{FIELD_NAME}`` override the
            defaults (e.g. ``PRISM_ENCODER_MAX_BATCH``). Empty: no environment overrides.
        environ: the environment to read (default ``os.environ``).
        title: title of the argument group (default: the class name).

    A field without a default becomes a required option unless its variable is set. An
    unparsable environment value is reported with ``parser.error`` naming the variable.
    Returns `parser`.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    env = os.environ if environ is None else environ
    group = parser.add_argument_group(title or cls.__name__)
    options: list[_Option] = []
    _add_fields(parser, group, cls, (), env_prefix, env, options, None)
    setattr(parser, _options_attr(cls), options)
    return parser


def _add_fields(
    parser: argparse.ArgumentParser,
    group: argparse._ArgumentGroup,
    cls: type,
    prefix: tuple[str, ...],
    env_prefix: str,
    env: Mapping[str, str],
    options: list[_Option],
    base: Any,
) -> None:
    """Adds the fields of `cls`; `base` is an instance whose values are the defaults (the
    outer field's default for a nested dataclass), or None."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        path = (*prefix, f.name)
        if dataclasses.is_dataclass(tp):
            if base is not None:
                nested = getattr(base, f.name)
            elif f.default is not _MISSING:
                nested = f.default
            elif f.default_factory is not _MISSING:
                nested = f.default_factory()
            else:
                nested = None
            _add_fields(parser, group, tp, path, env_prefix, env, options, nested)
            continue
        flag = "--" + f.name.replace("_", "-")
        dest = "__".join(path)
        env_name = f"{env_prefix}_{f.name.upper()}" if env_prefix else ""
        parse = _value_parser(tp)
        if base is not None:
            default: Any = getattr(base, f.name)
        elif f.default is not _MISSING:
            default = f.default
        elif f.default_factory is not _MISSING:
            default = f.default_factory()
        else:
            default = _MISSING
        if env_name and env_name in env:
            try:
                default = parse(env[env_name])
            except ValueError as e:
                parser.error(f"environment variable {env_name}: {e}")
        help_text = f.metadata.get("help", "")
        extra = [f"env {env_name}"] if env_name else []
        if default is not _MISSING:
            extra.append(f"default: {_format_default(default)}")
        help_text = f"{help_text} ({'; '.join(extra)})" if extra else help_text
        help_text = help_text.replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": dest, "help": help_text}
        if default is _MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        inner, _ = _strip_optional(tp)
        if inner is bool and tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            metavar = "A,B,..." if typing.get_origin(inner) is tuple else f.name.upper()
            if typing.get_origin(inner) is typing.Literal:
                metavar = "{" + ",".join(map(str, typing.get_args(inner))) + "}"
            group.add_argument(flag, type=_argparse_type(parse, f.name), metavar=metavar,
                               **kwargs)
        options.append(_Option(path=path, flag=flag, dest=dest, env=env_name))


def dataclass_from_args(
    cls: type[T], ns: argparse.Namespace, *, parser: argparse.ArgumentParser | None = None
) -> T:
    """Constructs `cls` from a namespace parsed by a parser set up with
    `add_dataclass_arguments(parser, cls, ...)`.

    With `parser`, a validation error from the dataclass (`ConfigError`, ValueError,
    TypeError) becomes ``parser.error(...)`` naming the option; without it, it propagates.
    """
    try:
        return _build(cls, ns, ())
    except ConfigError as e:
        if parser is None:
            raise
        parser.error(f"{_flag_for(parser, cls, e.field)}: {e.message}")
    except (ValueError, TypeError) as e:
        if parser is None:
            raise
        parser.error(f"invalid {cls.__name__}: {e}")
    raise AssertionError("unreachable")  # parser.error exits


def _build(cls: type[T], ns: argparse.Namespace, prefix: tuple[str, ...]) -> T:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        path = (*prefix, f.name)
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, ns, path)
        else:
            dest = "__".join(path)
            if not hasattr(ns, dest):
                raise TypeError(f"namespace has no value for {dest!r}: was "
                                f"add_dataclass_arguments called for {cls.__name__}?")
            kwargs[f.name] = getattr(ns, dest)
    return cls(**kwargs)


def _flag_for(parser: argparse.ArgumentParser, cls: type, field: str) -> str:
    """The option (and variable) of a field named in a ConfigError; nested fields too."""
    for opt in getattr(parser, _options_attr(cls), []):
        if opt.path[-1] == field or ".".join(opt.path) == field:
            return f"{opt.flag} ({opt.env})" if opt.env else opt.flag
    return field


def config_from_cli(
    cls: type[T],
    env_prefix: str,
    argv: Sequence[str] | None = None,
    *,
    description: str | None = None,
    prog: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Parses `argv` (default ``sys.argv[1:]``) and the environment into a `cls` instance;
    exits with a usage error on bad input."""
    parser = argparse.ArgumentParser(prog=prog, description=description or cls.__doc__)
    add_dataclass_arguments(parser, cls, env_prefix, environ=environ)
    ns = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    return dataclass_from_args(cls, ns, parser=parser)
