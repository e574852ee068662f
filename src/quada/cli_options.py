"""Command-line options built from the fields of a configuration dataclass.

A command names the fields it exposes (:func:`config_options`); each becomes the option spelled
like the field (``max_new_tokens``: ``--max-new-tokens``) unless its ``metadata["option"]`` names it, with the field's help
(``metadata["help"]``), its other spellings (``metadata["aliases"]``) and its default. A tuple is
written comma-separated (``--judges keyword,llm``, ``--grid 0,0.05``), or by repeating the option
when ``metadata["repeat"]`` is set (approximation specs contain commas).

The command receives the options the user gave, converted to the fields' types; the others are left
out, so the configuration's own defaults apply and each default is written once, in the dataclass.
Nothing here loads torch: ``quada --help`` builds every option from the dataclasses alone.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Collection
from dataclasses import MISSING, Field, fields
from types import UnionType
from typing import Annotated, Any

import typer
from rich.markup import escape

from quada.errors import QuadaError
from quada.options import field_flag, flag

AllPrompts = Annotated[bool, typer.Option("--all-prompts", help="Use every prompt of the benchmark instead of a limit.")]


def parse_names(text: str) -> tuple[str, ...]:
    """Comma-separated names, blanks dropped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_numbers(text: str, option: str) -> tuple[float, ...]:
    """Comma-separated numbers; ``clean`` stands for 0 (the unapproximated model). An empty entry
    (``0.1,,0.2``, a comma at the end) is refused: it is a number left out, not one to skip."""
    if not text.replace(",", "").strip():
        raise QuadaError(f"{option} is empty; write numbers separated by commas, e.g. 0,0.05,0.1")
    values = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise QuadaError(f"{option} {text!r} has an empty entry between commas; write one number between each "
                             "two commas, e.g. 0,0.05,0.1")
        if item.lower() == "clean":
            values.append(0.0)
            continue
        try:
            values.append(float(item))
        except ValueError:
            raise QuadaError(f"{option}: {item!r} is not a number; write numbers separated by commas, e.g. 0,0.05,0.1") from None
    return tuple(values)


def without_limit(config: type, options: dict[str, Any], all_prompts: bool) -> dict[str, Any]:
    """``options`` (given to a command of the configuration class ``config``) with no prompt limit
    when ``--all-prompts`` was given; both it and the limit is a contradiction, refused."""
    if not all_prompts:
        return options
    if "limit" in options:
        raise QuadaError(f"--all-prompts and {flag(config, 'limit')} both say how many prompts to use; give one of them")
    return {**options, "limit": None}


def field_help(config: type, name: str) -> str:
    """The help text of the field ``name`` of the dataclass ``config``."""
    return config.__dataclass_fields__[name].metadata["help"]


def _tuple_item(hint: Any) -> Any:
    """The item type of a tuple field (``tuple[float, ...]``, ``tuple[str, ...] | None``); None for others."""
    members = typing.get_args(hint) if isinstance(hint, UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    for member in members:
        if typing.get_origin(member) is tuple:
            return typing.get_args(member)[0]
    return None


def _default(field: Field) -> Any:
    """The default value of a dataclass field, from its factory when it has one."""
    return field.default_factory() if field.default is MISSING else field.default


def _option(field: Field, hint: Any, required: bool) -> tuple[inspect.Parameter, Callable[[Any], Any]]:
    """The typer parameter of one field, and how to turn what it reads into the field's value."""
    metadata = field.metadata
    aliases = metadata.get("aliases", ())
    # Without aliases typer spells the option after the parameter, and a boolean gets its --no- twin.
    names = (field_flag(field), *aliases) if aliases or "option" in metadata else ()
    default = ... if required else _default(field)
    item = _tuple_item(hint)
    annotation, convert = hint, (lambda value: value)
    if item is not None and metadata.get("repeat"):
        annotation, convert = list[str] | None, tuple
        default = ... if required else None
    elif item is not None and default is None:  # an optional list: given, or left out
        annotation, convert = str | None, parse_names
    elif item is not None:
        annotation = str
        if item is float:
            default = ",".join(repr(value).removesuffix(".0") for value in default)  # exact, and 0 not 0.0
            convert = functools.partial(parse_numbers, option=field_flag(field))
        else:
            default = ",".join(default)
            convert = parse_names
    # Help is plain text: brackets (pip install 'quada[ray]') are not rich markup.
    info = typer.Option(default, *names, help=escape(metadata["help"]))
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation), convert


def config_options(config: type, *names: str, required: Collection[str] = ()) -> Callable[[Callable], Callable]:
    """Give the decorated command one option per named field of the dataclass ``config`` (``required``
    ones must be given). The command's first parameter receives the given options as a dict of field
    values, ready for ``config(**options)``; its other parameters stay options of their own."""
    hints = typing.get_type_hints(config)
    by_name = {field.name: field for field in fields(config)}
    options = {name: _option(by_name[name], hints[name], name in required) for name in names}

    def decorate(command: Callable) -> Callable:
        own = list(inspect.signature(command, eval_str=True).parameters.values())[1:]

        @functools.wraps(command)
        def run(typer_context: typer.Context, **values: Any) -> Any:
            given = {}
            for name, (_, convert) in options.items():
                value = values.pop(name)
                # Typer's own click reports where a value came from; a default is left to the dataclass.
                if typer_context.get_parameter_source(name).name != "DEFAULT":
                    given[name] = convert(value)
            return command(given, **values)

        context = inspect.Parameter("typer_context", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        parameters = [context, *(parameter for parameter, _ in options.values())]
        parameters += [parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY) for parameter in own]
        run.__signature__ = inspect.Signature(parameters)
        run.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
        return run

    return decorate


def print_table(console, title: str, columns: list[str], rows: list[list[str]], justify: str = "left") -> None:
    """Print a table: on a terminal, one whose cells fold instead of being cut when it is narrow; in a
    log or a pipe, a Markdown table at its natural width (a terminal's width does not apply there)."""
    if not console.is_terminal:
        from quada.report.render import markdown_table

        console.print(f"{title}\n\n{markdown_table(columns, rows)}\n", markup=False, highlight=False, soft_wrap=True)
        return
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify=justify, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)

