"""What each config key means, read from the schema dataclasses' own source: the help text can't drift.

A field's meaning is the comment on its line and the comment lines right above it; a section's title
is its dataclass's docstring. Pure: dataclass types in, :class:`Section` rows out (the only input
read is the schema's source, through :mod:`inspect`, cached per class).

    for section in describe(CollectConfig):
        for key in section.keys:
            print(key.key, key.type, key.default, key.doc)
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["KeyDoc", "Section", "class_doc", "describe", "field_docs", "format_value", "type_label",
           "yaml_key_docs"]

REQUIRED = "???"  # OmegaConf's mark for a value that must be given


@dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted, as typed on the command line
    type: str  # "int", "int|null", "auto|off", "list[str]"
    default: str  # as it would be typed: null, true, [a, b]
    doc: str  # one line; "" when the schema says nothing


@dataclass(frozen=True)
class Section:
    prefix: str  # "" for top-level keys, else "pool.timeouts" (or "rewards[i]" for a list of dataclasses)
    title: str  # the dataclass's docstring, one line
    keys: tuple[KeyDoc, ...]


def describe(schema: type, prefix: str = "", value: Any = None) -> list[Section]:
    """One section per dataclass in ``schema`` (depth first), each listing its plain keys.

    Defaults come from ``value`` (an instance) when given, else from the schema's own field defaults; a
    nested dataclass's defaults are those of the instance its parent builds (``default_factory``).
    """
    hints = _hints(schema)
    docs = field_docs(schema)
    keys: list[KeyDoc] = []
    nested: list[Section] = []
    for f in dataclasses.fields(schema):
        tp = hints.get(f.name, f.type)
        key = f"{prefix}{f.name}"
        default = getattr(value, f.name) if value is not None else _default(f)
        inner = _strip_optional(tp)
        if _is_dataclass_type(inner):
            nested += describe(inner, key + ".", default if dataclasses.is_dataclass(default) else None)
            continue
        keys.append(KeyDoc(key, type_label(tp), format_value(default), docs.get(f.name) or _enum_doc(tp)))
        item = _list_item(inner)
        if item is not None and _is_dataclass_type(item):
            nested += describe(item, key + "[i].")
    title = class_doc(schema)
    return [Section(prefix.rstrip("."), title, tuple(keys)), *nested]


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """``{field: meaning}`` from the comments beside and above each field in the class's source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # built at run time: no source to read
        return {}
    lines = source.splitlines()
    comments = _comments(source)
    node = ast.parse(source).body[0]
    out: dict[str, str] = {}
    block, block_end = "", 0  # the last comment block above a field; it may speak for the fields right after it
    for stmt in getattr(node, "body", []):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        name = stmt.target.id
        above: list[str] = []
        row = stmt.lineno - 1  # 1-based line above the field
        while row >= 1 and lines[row - 1].strip().startswith("#"):
            above.insert(0, comments.get(row, ""))
            row -= 1
        inline = [comments[r] for r in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1) if r in comments
                  and not lines[r - 1].strip().startswith("#")]
        if above:
            block = " ".join(above)
        elif row != block_end:  # a blank line or another statement came between: the block is not ours
            block = ""
        block_end = stmt.end_lineno or stmt.lineno
        text = " ".join(part for part in [*above, *inline] if part)
        if not text and re.search(rf"\b{re.escape(name)}\b", block):
            text = block  # "... for trial_s: if it fell by more than trial_tolerance ..." names this field too
        if text:
            out[name] = text
    return out


@functools.lru_cache(maxsize=None)
def class_doc(cls: type) -> str:
    """The class's own docstring as one line ("" for none: a dataclass's generated signature doesn't count)."""
    try:
        node = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
        doc = ast.get_docstring(node) if isinstance(node, ast.ClassDef) else None
    except (OSError, TypeError, SyntaxError):
        doc = cls.__dict__.get("__doc__")
        if doc and (doc.startswith(f"{cls.__name__}(") or doc.startswith("An enumeration")):
            doc = None
    return " ".join((doc or "").split("\n\n")[0].split())


def type_label(tp: Any) -> str:
    """A type as a user types values: ``int|null``, ``auto|off`` (an Enum's names), ``list[str]``."""
    if isinstance(tp, str):
        return tp
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        named = [type_label(a) for a in args if a is not type(None)]
        return "|".join(named) + ("|null" if type(None) in args else "")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "|".join(tp.__members__)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(type_label(a) for a in args)}]"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def format_value(value: Any) -> str:
    """A value as it would be typed in an override: ``null``, ``true``, ``[a, b]``, ``{k: v}``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return "{" + ", ".join(f"{f.name}: {format_value(getattr(value, f.name))}"
                               for f in dataclasses.fields(value)) + "}"
    if isinstance(value, str) and value == "":
        return "''"
    return str(value)


def yaml_key_docs(text: str) -> dict[str, tuple[str, str]]:
    """``{dotted key: (value, meaning)}`` for a plain YAML mapping, from the comments beside and above keys.

    Enough for our config groups (block mappings, one key a line); flow values are kept as written.
    """
    out: dict[str, tuple[str, str]] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the mappings we are inside
    pending: list[str] = []
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("# @package"):
            pending = []
            continue
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        m = re.match(r"^(\s*)([\w.-]+):\s*(.*)$", raw)
        if not m or raw.lstrip().startswith("-"):
            pending = []
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        value, _, comment = rest.partition(" #")
        dotted = ".".join([k for _, k in stack] + [key])
        doc = " ".join(p for p in [*pending, comment.strip()] if p)
        if value.strip():
            out[dotted] = (value.strip(), doc)
        else:
            stack.append((indent, key))
        pending = []
    return out


def _comments(source: str) -> dict[int, str]:
    """``{line: comment text}`` for every ``#`` comment (tokenized: a ``#`` inside a string is no comment)."""
    out: dict[int, str] = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                out[tok.start[0]] = tok.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError):
        pass  # a truncated class source still yields the comments before the error
    return out


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation naming something not importable at run time: keep its text
        return {}


def _strip_optional(tp: Any) -> Any:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


def _list_item(tp: Any) -> Optional[Any]:
    return typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else None


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return REQUIRED


def _enum_doc(tp: Any) -> str:
    """For an Enum-typed field the schema left bare: its members' own comments, or the Enum's docstring."""
    tp = _strip_optional(tp)
    if not (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        return ""
    member_docs = _member_comments(tp)
    if member_docs:
        return "; ".join(f"{name}: {doc}" for name, doc in member_docs.items())
    return class_doc(tp)


@functools.lru_cache(maxsize=None)
def _member_comments(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = _comments(source)
    node = ast.parse(source).body[0]
    return {stmt.targets[0].id: comments[stmt.lineno] for stmt in getattr(node, "body", [])
            if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name) and stmt.lineno in comments}
