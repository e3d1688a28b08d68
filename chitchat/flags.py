"""Command-line flags from dataclasses: each option's type, default and help live in
exactly one place, its field (`opt`), and the argparse parser, the parsing into the
dataclass and the README's flag tables are all built from it.

Each field's metadata may hold:
  help     the --help text (required for a flag)
  choices  allowed values
  aliases  extra flag spellings, e.g. ["--no-stream"]
  bool     "flag" (store_true, the default for bools) or "optional" (--x/--no-x)
  metavar  argparse's metavar

A field whose type is itself a dataclass is an option group (`group`): its flags are the
tool's flags too, flat (--topk, not --decoding.topk), and it validates itself.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .utils import ChitchatError


def opt(default: Any, help: str, **meta) -> Any:
    """A dataclass field carrying its command-line help."""
    return field(default=default, metadata={"help": help, **meta})


def base_type(tp):
    """Unwrap `X | None` to X."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


@dataclass(frozen=True)
class Flag:
    """One command-line flag: its dest (a field name), option strings, type and default."""
    dest: str
    names: tuple[str, ...]
    type: Any
    default: Any
    meta: Any  # the field's metadata (help, choices, bool, metavar)


def flags(cls) -> list[Flag]:
    """Every flag of a tool's config, in order. A field whose type is a dataclass (an option
    group such as DecodingOptions) contributes the group's flags, flat: its metadata may
    narrow them (`flags`: the dests to expose) and add spellings (`aliases`: dest -> extra
    option strings); the group's default instance gives their defaults."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = base_type(hints[f.name])
        if dataclasses.is_dataclass(tp):
            defaults = f.default_factory()
            only, extra = f.metadata.get("flags"), f.metadata.get("aliases", {})
            out += [dataclasses.replace(g, names=g.names + tuple(extra.get(g.dest, ())),
                                        default=getattr(defaults, g.dest))
                    for g in flags(tp) if only is None or g.dest in only]
        elif "help" in f.metadata:
            default = f.default if f.default is not dataclasses.MISSING else None
            out.append(Flag(f.name, (f"--{f.name}", *f.metadata.get("aliases", ())), tp,
                            default, f.metadata))
    return out


def group(cls, **meta) -> Any:
    """A config field holding an option group (see `flags` for `meta`)."""
    return field(default_factory=cls, metadata=meta)


def build_parser(cls, description: str = "", epilog: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    for fl in flags(cls):
        meta = fl.meta
        helptext = meta["help"] + ("" if fl.type is bool else f" (default: {fl.default})")
        if fl.type is bool:
            action = (argparse.BooleanOptionalAction if meta.get("bool") == "optional"
                      else "store_true")
            parser.add_argument(*fl.names, dest=fl.dest, action=action, default=fl.default,
                                help=helptext)
            continue
        parser.add_argument(*fl.names, dest=fl.dest, type=fl.type, default=fl.default,
                            choices=meta.get("choices"), help=helptext,
                            metavar=meta.get("metavar"))
    return parser


def from_flags(cls, values: dict):
    """`cls` built from flat flag values (an argparse namespace's): each option group gets
    the flags it exposes, the rest keep the group's defaults. Validation runs as usual."""
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = base_type(hints[f.name])
        if dataclasses.is_dataclass(tp):
            only = f.metadata.get("flags") or [g.name for g in dataclasses.fields(tp)]
            kw[f.name] = dataclasses.replace(f.default_factory(),
                                             **{k: values[k] for k in only if k in values})
        elif f.name in values:
            kw[f.name] = values[f.name]
    return cls(**kw)


def parse_config(cls, argv=None, description: str = "", epilog: str = ""):
    """Parse argv into `cls`; validation errors from __post_init__ become usage errors."""
    parser = build_parser(cls, description, epilog)
    ns = parser.parse_args(argv)
    try:
        return from_flags(cls, vars(ns))
    except ChitchatError as e:
        parser.error(str(e))


def given_flags(cls, argv=None) -> frozenset[str]:
    """The dests of the flags typed in `argv` (a valid command line of `cls`), whatever
    their values: a flag typed with its default value counts, which comparing the parsed
    value with the default cannot tell."""
    parser = build_parser(cls)
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # an untyped flag then leaves no attribute
    return frozenset(vars(parser.parse_args(argv)))


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ChitchatError(msg)


def markdown_flags(cls) -> str:
    """The flags of a tool as a Markdown table, for the README (kept in sync by a test)."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for fl in flags(cls):
        names = " ".join(f"`{n}`" for n in fl.names)
        if fl.type is bool and fl.meta.get("bool") == "optional":
            names = f"`--{fl.dest}` / `--no-{fl.dest}`"
        default = "" if (fl.type is bool and not fl.default) or fl.default is None \
            else f"`{fl.default}`"
        choices = fl.meta.get("choices")
        extra = f" ({' / '.join(map(str, choices))})" if choices else ""
        rows.append(f"| {names} | {default} | {fl.meta['help'].replace('%%', '%')}{extra} |")
    return "\n".join(rows)
