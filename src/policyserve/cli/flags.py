"""Command-line flags derived from configuration dataclasses, and the parser every command uses.

A config field such as ``n_envs: int = 1`` followed by its docstring becomes ``--n-envs N``: the default is
the field's default (or the value in a config instance the command passes), the help is the field's
docstring, the type comes from the annotation (``bool`` fields become ``--x`` / ``--no-x`` that also take
GR00T's ``--x True`` / ``--x False``; ``X | None`` fields keep None as their default, numbers also take
``none``). Every long flag of every command is also accepted in its underscore spelling (``--model_path``,
``--embodiment_tag``, as GR00T's ``run_gr00t_server.py`` and IsaacLab's GR00T scripts write them).

Each parser keeps a field -> flag map (``args.field_flags``), so that the CLI can say ``--n-envs`` where a
library error names the field ``n_envs``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

FIELD_FLAGS = "field_flags"
"""Name of the parser default (``args.field_flags``) that maps config field names to their flags."""

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that also accepts the underscore spelling of every long flag (``--model_path``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        """Parse ``args`` (default ``sys.argv[1:]``) after :func:`normalize_flags`."""
        argv = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(normalize_flags(argv), namespace)


def normalize_flags(argv: Sequence[str]) -> list[str]:
    """``--model_path X`` -> ``--model-path X`` (also ``--a_b=V``); nothing after a bare ``--`` is touched."""
    out: list[str] = []
    for i, token in enumerate(argv):
        if token == "--":
            return out + list(argv[i:])
        if token.startswith("--") and len(token) > 2:
            name, sep, value = token.partition("=")
            token = name.replace("_", "-") + sep + value
        out.append(token)
    return out


def parse_bool(text: str) -> bool:
    """``True``/``False`` (also yes/no, on/off, 1/0; any case) -> bool."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def parse_size(text: str) -> tuple[int, int]:
    """``'128'`` or ``'128x96'`` (HxW) -> ``(H, W)``."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SIZE or HxW, got {text!r}") from None
    if len(values) == 1:
        values *= 2
    if len(values) == 2 and min(values) >= 1:
        return values[0], values[1]
    raise argparse.ArgumentTypeError(f"expected SIZE or HxW, got {text!r}")


def parse_names(text: str) -> tuple[str, ...]:
    """Comma-separated names; ``""`` or ``none`` for none."""
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(name.strip() for name in text.split(",") if name.strip())


class BoolAction(argparse.Action):
    """``--x`` and ``--x True`` set True, ``--x False`` and ``--no-x`` set False."""

    def __init__(self, option_strings: Sequence[str], dest: str, default: Any = None, required: bool = False,
                 help: str | None = None) -> None:  # noqa: A002 - argparse's keyword
        names = list(option_strings)
        names += [f"--no-{o[2:]}" for o in option_strings if o.startswith("--")]
        super().__init__(names, dest, nargs="?", type=parse_bool, default=default, required=required, help=help,
                         metavar="BOOL")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if option_string is not None and option_string.startswith("--no-"):
            if values is not None:
                raise argparse.ArgumentError(self, f"{option_string} takes no value")
            values = False
        setattr(namespace, self.dest, True if values is None else values)

    def format_usage(self) -> str:
        """Short form for the usage line."""
        return self.option_strings[0]


class HelpFormatter(argparse.HelpFormatter):
    """Shows a bool flag as ``--x [True|False], --no-x``."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, BoolAction):
            yes = [o for o in action.option_strings if not o.startswith("--no-")]
            no = [o for o in action.option_strings if o.startswith("--no-")]
            return ", ".join([f"{o} [True|False]" for o in yes] + no)
        return super()._format_action_invocation(action)


class RawDescriptionHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """:class:`HelpFormatter` that keeps a description's line breaks (command docstrings)."""


# ---------------------------------------------------------------------------------------- field docstrings
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass and its bases: ``{field: text}`` (a string right under a field)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        docs.update(_class_field_docs(klass))
    return docs


_DOC_CACHE: dict[type, dict[str, str]] = {}


def _class_field_docs(klass: type) -> dict[str, str]:
    if klass in _DOC_CACHE:
        return _DOC_CACHE[klass]
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0]
    docs: dict[str, str] = {}
    statements = getattr(body, "body", [])
    for stmt, after in zip(statements, statements[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    _DOC_CACHE[klass] = docs
    return docs


# -------------------------------------------------------------------------------------------- the flags
@dataclasses.dataclass(frozen=True)
class Flag:
    """What the command line changes about one config field's derived flag (everything else is derived)."""

    name: str | None = None
    """Flag name without the dashes (default: the field name with ``-`` for ``_``)."""
    help: str | None = None
    """Help for a field that has no docstring (the docstring wins), or, starting with '+', text added after it."""
    parse: Callable[[str], Any] | None = None
    """Converts the flag's text (default: from the annotation)."""
    choices: Sequence[Any] | None = None
    """Accepted values (default: a ``Literal`` annotation's values)."""
    metavar: str | None = None
    """Placeholder shown in the help."""
    default: Any = "<the config's>"
    """Default that differs from the config's (e.g. None for "not given")."""
    required: bool = False
    """The flag must be given."""
    scale: float = 1
    """The field's value is the flag's number times this (e.g. ``2**20`` for a field in bytes, a flag in MiB)."""


def field_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """The parser's field -> flag map (shared with ``args.field_flags``)."""
    mapping = parser.get_default(FIELD_FLAGS)
    if mapping is None:
        mapping = {}
        parser.set_defaults(**{FIELD_FLAGS: mapping})
    return mapping


def add_config_flags(parser: argparse.ArgumentParser | Any, config: type | object, fields: Iterable[str],
                     *, owner: argparse.ArgumentParser | None = None,
                     **flags: Flag) -> dict[str, str]:
    """Add one flag per named field of ``config`` (a dataclass, or an instance whose values are the defaults).

    ``parser`` may be an argument group (then pass the parser as ``owner`` for the field -> flag map);
    ``flags`` override the derived form per field. Returns ``{field: dest}`` for :func:`config_kwargs`.
    """
    cls = config if isinstance(config, type) else type(config)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    mapping = field_flags(owner or parser)
    names = list(fields)
    for name in names:
        if name not in by_name:
            raise TypeError(f"{cls.__name__} has no field {name!r}")
        mapping[name] = "--" + (flags.get(name, Flag()).name or name.replace("_", "-"))
    dests: dict[str, str] = {}
    for name in names:
        override = flags.get(name, Flag())
        flag = mapping[name]
        default = _default(config, by_name[name]) if override.default == Flag.default else override.default
        shown = None if override.required else default if override.scale == 1 or default is None \
            else f"{_number(default / override.scale)} {override.metavar or ''}".strip()
        help_text = _help(docs.get(name), override.help, shown, mapping)
        kwargs = _argparse_kwargs(hints[name], override, f"{cls.__name__}.{name}")
        if override.scale != 1:
            kwargs["type"] = _scaled(kwargs.get("type", float), override.scale, hints[name])
        dest = flag[2:].replace("-", "_")
        parser.add_argument(flag, dest=dest, default=default, help=help_text, required=override.required, **kwargs)
        dests[name] = dest
    return dests


def config_kwargs(args: argparse.Namespace, dests: Mapping[str, str]) -> dict[str, Any]:
    """``{field: value}`` of the flags :func:`add_config_flags` added (its return value)."""
    return {name: getattr(args, dest) for name, dest in dests.items()}


def _default(config: type | object, field: dataclasses.Field) -> Any:
    if not isinstance(config, type):
        return getattr(config, field.name)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return None


def _help(doc: str | None, extra: str | None, default: Any, mapping: Mapping[str, str]) -> str:
    text = doc or ""
    if extra and extra.startswith("+"):
        text = f"{text} {extra[1:].strip()}".strip()
    elif extra and not text:
        text = extra
    # ``field`` -> --flag where the field has one, else plain text
    text = re.sub(r"``([^`]+)``", lambda m: mapping.get(m.group(1), m.group(1)), text)
    text = re.sub(r":\w+:`~?([\w.]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], text)  # :class:`~a.B` -> B
    text = " ".join(text.split())
    if default is not None and default is not False and default not in ((), [], "") \
            and "default" not in text.lower():
        text = text.rstrip(".")
        shown = "on" if default is True else "x".join(map(str, default)) if isinstance(default, tuple) else default
        text = f"{text} (default {shown})" if text else f"default {shown}"
    return text.replace("%", "%%")


def _argparse_kwargs(annotation: Any, override: Flag, where: str) -> dict[str, Any]:
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(members) < len(typing.get_args(annotation))
        if len(members) != 1 and override.parse is None:
            raise TypeError(f"{where}: no flag type for {annotation}; give Flag(parse=...)")
        annotation = members[0] if len(members) == 1 else annotation
        origin = typing.get_origin(annotation)
    kwargs: dict[str, Any] = {}
    if override.metavar:
        kwargs["metavar"] = override.metavar
    if override.parse is not None:
        return {**kwargs, "type": override.parse, **({"choices": override.choices} if override.choices else {})}
    if annotation is bool:
        return {"action": BoolAction}
    if origin is typing.Literal:
        values = typing.get_args(annotation)
        return {**kwargs, "type": type(values[0]), "choices": override.choices or values}
    if annotation in (int, float):
        parse = _or_none(annotation) if optional else annotation
        kwargs.setdefault("metavar", "N" if annotation is int else "X")
        return {**kwargs, "type": parse, **({"choices": override.choices} if override.choices else {})}
    if annotation is str:
        return {**kwargs, **({"choices": override.choices} if override.choices else {})}
    args = typing.get_args(annotation)
    if origin is tuple and args == (int, int):
        return {"metavar": override.metavar or "SIZE|HxW", "type": parse_size}
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] is str:
        return {"metavar": override.metavar or "A,B,...", "type": parse_names}
    if origin in (list, tuple) and len(args) >= 1 and args[0] in (int, float, str):
        return {"metavar": override.metavar or ("N" if args[0] is int else None), "type": args[0], "nargs": "+"}
    raise TypeError(f"{where}: no flag type for {annotation}; give Flag(parse=...)")


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _scaled(parse: Callable[[str], Any], scale: float, annotation: Any) -> Callable[[str], Any]:
    """The flag's number times ``scale``, as the field's type (an int field stays an int)."""
    as_int = annotation is int or int in typing.get_args(annotation)

    def parse_scaled(text: str) -> Any:
        value = float(text) * scale
        return int(value) if as_int else value

    parse_scaled.__name__ = "number"
    return parse_scaled


def _or_none(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if text.strip().lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} or none, got {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


# ----------------------------------------------------------------------------------- errors -> flags
_FIELD_WORD = re.compile(r"(?<![\w.'\"`/-])([a-z][a-z0-9]*(?:_[a-z0-9]+)*)(?![\w'\"`(=/-])")


def name_flags(message: str, mapping: Mapping[str, str]) -> str:
    """A library message with the config field names it mentions replaced by the command's flags.

    Fields with an underscore (``n_envs``) are replaced wherever they stand as a word, one-word fields
    (``task``) only when they open the message, where they are its subject; ``overwrite=True`` becomes the
    flag too.
    """
    if not mapping:
        return message
    message = re.sub(r"\b([a-z][a-z0-9_]*)=True\b",
                     lambda m: mapping.get(m.group(1), m.group(0)), message)  # pass overwrite=True -> --overwrite

    def replace(match: re.Match[str]) -> str:
        word = match.group(1)
        if word in mapping and ("_" in word or match.start() == 0):
            return mapping[word]
        return word

    return _FIELD_WORD.sub(replace, message)
