"""MkDocs hook: generate the command-line reference (docs/cli.md) from the argument parser itself.

The page holds the marker ``<!-- CLI REFERENCE -->``; this hook replaces it with the ``--help`` text of the
main parser and of every subcommand, as ``hf_clafusion.cli.build_parser()`` builds them at documentation build
time, so the reference cannot drift from the code. Registered in ``mkdocs.yml`` under ``hooks:``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path


MARKER = "<!-- CLI REFERENCE -->"
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


def cli_reference() -> str:
    """Markdown: a heading and a fenced block of ``--help`` output for the main parser and each subcommand."""
    root = Path(__file__).resolve().parent.parent
    if str(root) not in sys.path:  # build from a checkout without installing the package
        sys.path.insert(0, str(root))
    from hf_clafusion.cli import build_parser

    parser = build_parser()
    sections = [f"### `{parser.prog}`\n\n```text\n{_with_width(parser)}\n```\n"]
    for name, sub in _subcommands(parser).items():
        sections.append(f"### `{parser.prog} {name}`\n\n```text\n{_with_width(sub)}\n```\n")
    return "\n".join(sections)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, cli_reference())
