"""The parser machinery every command shares: one-line argparse errors, help that shows defaults,
options derived from the typed fields of a dataclass (their help from the class docstring's
``Attributes:`` section, :func:`field_help`), and the argument types (counts, data set names, threads)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import re
import types
import typing
from typing import Any

from .errors import EXIT_USAGE, flag_of


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (with the closest choice or option, when there
    is one, and a pointer to --help) instead of the usage followed by the error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {self._suggest(message)} (see {self.prog} --help)\n")

    def _suggest(self, message: str) -> str:
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if choice:
            bad, choices = choice.group(1), re.findall(r"'([^']*)'", choice.group(2))
            close = difflib.get_close_matches(bad, choices, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return f"{message[:choice.start()]}invalid choice {bad!r}{hint} (choose from {', '.join(choices)})"
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown:  # reported by the top-level parser: look at the subcommands' options too
            parsers = [self] + [p for a in self._actions if isinstance(a, argparse._SubParsersAction)
                                for p in a.choices.values()]
            options = [s for p in parsers for a in p._actions for s in a.option_strings]
            close = difflib.get_close_matches(unknown.group(1).split("=")[0], options, n=1)
            if close:
                return f"{message}; did you mean {close[0]}?"
        return message


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default after its help, unless the default is None or False (nothing); a
    list default as it is typed (``0 0.5 1``), not as a Python list."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or isinstance(action, argparse._VersionAction):
            return action.help or ""
        if isinstance(action.default, (list, tuple)):
            return f"{action.help} (default: {' '.join(map(str, action.default))})"
        return super()._get_help_string(action)


def _plain(text: str) -> str:
    """Help text without reStructuredText markup: ``x``, `x` and :role:`x` become x."""
    return re.sub(r"(?::\w+:)?`{1,2}([^`]+)`{1,2}", r"\1", text)


def field_help(cls) -> dict[str, str]:
    """Per-field help from the ``Attributes:`` section of a class docstring (Google style): an entry
    ``name: text`` per field, continued on lines indented deeper than the names. Only indentation
    relative to the section counts (the docstring is dedented first), and the section ends at the
    first line indented no deeper than its ``Attributes:`` header. Markup is removed."""
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Attributes:"), None)
    if start is None:
        return {}

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip())

    out: dict[str, str] = {}
    current, item_indent = None, None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        if indent(line) <= indent(lines[start]):
            break
        item_indent = indent(line) if item_indent is None else item_indent
        head, sep, rest = line.strip().partition(":")
        if indent(line) == item_indent and sep and head.isidentifier():
            current = head
            out[current] = rest.strip()
        elif current is not None:
            out[current] += " " + line.strip()
    return {name: _plain(text) for name, text in out.items()}


def _shown(value: Any, flag: str) -> str:
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    if isinstance(value, (tuple, list)):
        return " ".join(str(v) for v in value)
    return "none" if value is None else str(value)


def add_dataclass_options(parser: argparse.ArgumentParser, cls, choices: dict[str, tuple] | None = None,
                          defaults: dict[str, Any] | None = None, helps: dict[str, str] | None = None) -> None:
    """One option per field of the dataclass ``cls``, its help from :func:`field_help` (or
    ``helps[name]``) followed by the default (``defaults[name]``, else the field's own). The parsed
    defaults are SUPPRESSed, so only flags given on the command line appear in the namespace."""
    hints = typing.get_type_hints(cls)
    helps = {**field_help(cls), **(helps or {})}
    group = parser.add_argument_group(f"{cls.__name__} options")
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        args = typing.get_args(tp)
        optional = type(None) in args and (typing.get_origin(tp) in (typing.Union, types.UnionType))
        base = next(a for a in args if a is not type(None)) if optional else tp
        shown = (defaults or {}).get(field.name, field.default)
        text = f"{helps.get(field.name, '')} (default: {_shown(shown, flag_of(field.name))})".replace("%", "%%")
        kw: dict[str, Any] = dict(default=argparse.SUPPRESS, help=text)
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is tuple:
            item_types = typing.get_args(base)
            kw["type"] = item_types[0]
            kw["nargs"] = "+" if Ellipsis in item_types else len(item_types)
            kw["metavar"] = item_types[0].__name__.upper()
        else:
            kw["type"] = base
            kw["metavar"] = base.__name__.upper()
        if choices and field.name in choices:
            kw["choices"] = choices[field.name]
            kw.pop("metavar", None)
        if optional and base is not str:
            kw["type"] = _none_or(base)
        group.add_argument(flag_of(field.name), dest=field.name, **kw)


def _none_or(tp):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else tp(text)

    parse.__name__ = tp.__name__
    return parse



# --------------------------------------------------------------------------- argument types
def count(minimum: int):
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def dataset_name(text: str) -> str:
    """An argparse type: a name :func:`torchglow.data.load_dataset` can read."""
    from ..data import DatasetError, check_dataset_name

    try:
        return check_dataset_name(text)
    except DatasetError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def dataset_help() -> str:
    from ..data import DATASETS

    return f"data set: {', '.join(DATASETS)}, or a folder of images"


THREADS_HELP = ("CPU threads for torch: a number, or auto (OMP_NUM_THREADS when set, else the cores that the "
                "1-minute load average leaves idle, at least 1: on a busy machine that is 1)")


def parse_threads(text: str) -> int | None:
    """An argparse type: ``auto`` -> None (decided at start-up, :func:`torchglow.threads.set_threads`),
    else a positive integer."""
    if text == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {n}")
    return n


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=parse_threads, default="auto", metavar="N|auto", help=THREADS_HELP)
