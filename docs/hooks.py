"""MkDocs hook: generate reference pages from the code itself, so they cannot drift from it.

- ``<!-- CLI REFERENCE -->`` (docs/cli.md) becomes the ``--help`` text of the main parser and of every
  subcommand, as ``hf_clafusion.cli.build_parser()`` builds them at documentation build time.
- ``<!-- CONFIG FIELDS: FusionConfig -->`` (docs/configuration.md; likewise ``FinetuneConfig``) becomes a table of
  the dataclass's fields: name, type, default, allowed values (from the field's ``Literal`` type, see
  ``hf_clafusion.config.describe_choices``) and the field's ``metadata["help"]``.

Registered in ``mkdocs.yml`` under ``hooks:``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import sys
from pathlib import Path


MARKER = "<!-- CLI REFERENCE -->"
CONFIG_MARKER = re.compile(r"<!-- CONFIG FIELDS: (\w+) -->")
WIDTH = 100  # fixed, so the output does not depend on the terminal that builds the docs


def _with_width(parser: argparse.ArgumentParser) -> str:
    """``parser.format_help()`` wrapped at :data:`WIDTH` columns, whatever the terminal size."""
    formatter_class = parser.formatter_class
    parser.formatter_class = functools.partial(formatter_class, width=WIDTH)
    try:
        return parser.format_help().rstrip()
    finally:
        parser.formatter_class = formatter_class


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _import_path() -> None:
    root = Path(__file__).resolve().parent.parent
    if str(root) not in sys.path:  # build from a checkout without installing the package
        sys.path.insert(0, str(root))


def cli_reference() -> str:
    """Markdown: a heading and a fenced block of ``--help`` output for the main parser and each subcommand."""
    _import_path()
    from hf_clafusion.cli import build_parser

    parser = build_parser()
    sections = [f"### `{parser.prog}`\n\n```text\n{_with_width(parser)}\n```\n"]
    for name, sub in _subcommands(parser).items():
        sections.append(f"### `{parser.prog} {name}`\n\n```text\n{_with_width(sub)}\n```\n")
    return "\n".join(sections)


def _cell(text: str) -> str:
    """A table cell: one line, with ``|`` escaped outside code spans (the tables extension keeps those whole)."""
    parts = text.replace("\n", " ").split("`")
    return "`".join(part if i % 2 else part.replace("|", "\\|") for i, part in enumerate(parts))


def config_table(class_name: str) -> str:
    """Markdown table of the fields of ``hf_clafusion.config.<class_name>``, one row per field in field order."""
    _import_path()
    from hf_clafusion import config as config_module

    cls = getattr(config_module, class_name)
    choices = config_module.describe_choices(cls)
    rows = ["| field | type | default | allowed values | meaning |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        allowed = choices.get(f.name, "")
        cells = [f"`{f.name}`", f"`{f.type}`", f"`{default!r}`", allowed, f.metadata.get("help", "")]
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, cli_reference())
    return CONFIG_MARKER.sub(lambda match: config_table(match[1]), markdown)
