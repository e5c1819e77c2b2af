"""Every Python example of README.md and docs/*.md runs as pasted.

Each page's ```python / ```py blocks run in order, in one namespace, in a fresh temporary working directory,
offline (``HF_HUB_OFFLINE=1``, set by conftest). A block that cannot run here is marked on the line right before
its fence with ``<!-- no-test: the reason -->`` (it needs the Hub, a GPU, a file the reader has, or it is a
signature or fragment); the reason is required, and such blocks should stay few. A block that runs but takes
long (a real pretrained model) is marked ``<!-- slow-test: the reason -->``: its whole page then runs only with
``pytest -m slow``.

A page whose examples change process-wide state (registering an adapter, adding a family to a shared table) says
so once, anywhere on the page, with ``<!-- subprocess-test: the reason -->``: its blocks then run, still in order in
one namespace, in a fresh Python process, so the test process's registries stay as they were.
"""

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON_INFOS = {"python", "py"}
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
MARKER = re.compile(r"^\s*<!--\s*(?P<kind>no-test|slow-test):\s*(?P<reason>.*?)\s*-->\s*$")
PAGE_MARKER = re.compile(r"^\s*<!--\s*subprocess-test:\s*(?P<reason>.*?)\s*-->\s*$")
# What the fresh process runs: the blocks, given as JSON [[where, code], ...] on stdin, in one namespace.
SUBPROCESS_RUNNER = """
import json, sys, traceback
namespace = {"__name__": "__main__"}
for where, code in json.load(sys.stdin):
    try:
        exec(compile(code, where, "exec"), namespace)
    except Exception as error:
        traceback.print_exc()
        print(f"The example at {where} raised {type(error).__name__}: {error}", file=sys.stderr)
        sys.exit(1)
"""
# At most this share of all Python blocks may be marked as not runnable.
MAX_MARKED_SHARE = 0.34
# Pages whose examples were being rewritten on other branches when this test was written: they must fail here
# (strict xfail), so that the test says so once they run; then remove them from this dict.
NOT_YET_RUNNABLE: dict[str, str] = {}  # page -> why it cannot run yet (a strict xfail); keep it empty


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    code: str
    skip_reason: str | None  # the no-test marker's reason, None when the block must run
    slow_reason: str | None = None  # the slow-test marker's reason: the block runs under ``pytest -m slow``


def python_blocks(page: Path) -> list[Block]:
    """The top-level Python blocks of a Markdown page (blocks nested in a longer fence are text, not code)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        fence, indent = match["fence"], len(match["indent"])
        info = match["info"].strip().split(" ")[0].lower()
        end = index + 1
        while end < len(lines):
            closing = FENCE.match(lines[end])
            if closing and closing["fence"][0] == fence[0] and len(closing["fence"]) >= len(fence):
                if not closing["info"].strip():
                    break
            end += 1
        if info in PYTHON_INFOS:
            previous = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
            marker = MARKER.match(previous)
            kind = marker["kind"] if marker else None
            code = "\n".join(line[indent:] for line in lines[index + 1 : end])
            blocks.append(
                Block(
                    page,
                    index + 1,
                    code + "\n",
                    skip_reason=marker["reason"] if kind == "no-test" else None,
                    slow_reason=marker["reason"] if kind == "slow-test" else None,
                )
            )
        index = end + 1
    return blocks


def subprocess_reason(page: Path) -> str | None:
    """The reason given by the page's ``<!-- subprocess-test: ... -->`` marker, or None when it runs in-process."""
    for line in page.read_text(encoding="utf-8").splitlines():
        marker = PAGE_MARKER.match(line)
        if marker:
            return marker["reason"]
    return None


def run_in_subprocess(page: Path, cwd: Path) -> str | None:
    """Run the page's runnable blocks in order in a fresh Python process; the failure report, or None."""
    blocks = [[f"{page_id(page)}:{b.line}", b.code] for b in python_blocks(page) if b.skip_reason is None]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    completed = subprocess.run(  # noqa: S603 - the documentation's own code, run by this interpreter
        [sys.executable, "-c", SUBPROCESS_RUNNER],
        input=json.dumps(blocks),
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if completed.returncode == 0:
        return None
    return completed.stderr[-4000:] or f"exit status {completed.returncode}"


ALL_BLOCKS = [block for page in PAGES for block in python_blocks(page)]


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else page.name


def page_marks(page: Path) -> list:
    marks = [pytest.mark.slow] if any(block.slow_reason for block in python_blocks(page)) else []
    if page_id(page) in NOT_YET_RUNNABLE:
        marks.append(pytest.mark.xfail(strict=True, reason=NOT_YET_RUNNABLE[page_id(page)]))
    return marks


PAGES_WITH_CODE = [
    pytest.param(page, marks=page_marks(page))
    for page in PAGES
    if any(block.skip_reason is None for block in python_blocks(page))
]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=page_id)
def test_the_python_examples_of_a_page_run_in_order_as_pasted(page, tmp_path, monkeypatch):
    if subprocess_reason(page) is not None:
        failure = run_in_subprocess(page, tmp_path)
        if failure is not None:
            pytest.fail(f"The examples of {page_id(page)} failed in a fresh process:\n{failure}")
        return
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    for block in python_blocks(page):
        if block.skip_reason is not None:
            continue
        where = f"{page_id(page)}:{block.line}"
        try:
            exec(compile(block.code, where, "exec"), namespace)  # noqa: S102 - the documentation's own code
        except Exception as error:
            pytest.fail(f"The example at {where} raised {type(error).__name__}: {error}")


def test_every_skipped_example_says_why_and_skipped_examples_are_few():
    marked = [block for block in ALL_BLOCKS if block.skip_reason is not None]
    unexplained = [b for b in ALL_BLOCKS if b.skip_reason == "" or b.slow_reason == ""]
    assert not unexplained, [f"{page_id(b.page)}:{b.line}" for b in unexplained]
    assert [page_id(page) for page in PAGES if subprocess_reason(page) == ""] == []
    assert len(marked) <= MAX_MARKED_SHARE * len(ALL_BLOCKS), (
        f"{len(marked)} of {len(ALL_BLOCKS)} Python examples are marked no-test: "
        + ", ".join(f"{page_id(b.page)}:{b.line} ({b.skip_reason})" for b in marked)
    )


def test_every_no_test_marker_stands_right_before_a_python_example():
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        starts = {block.line for block in python_blocks(page) if block.skip_reason is not None or block.slow_reason}
        for number, line in enumerate(lines, start=1):
            if MARKER.match(line):
                following = next((n for n in range(number + 1, len(lines) + 1) if lines[n - 1].strip()), None)
                assert following in starts, (
                    f"{page_id(page)}:{number}: the no-test marker is not followed by a Python block"
                )


def test_the_block_parser_reads_markers_and_ignores_python_fences_nested_in_a_longer_fence(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- no-test: a fragment -->\n```py\nfoo(\n```\n\n````markdown\n```python\nnot code\n```\n````\n\n"
        "```python\nx = 1\n```\n\n<!-- slow-test: a big model -->\n\n```py\ny = 2\n```\n",
        encoding="utf-8",
    )
    blocks = python_blocks(page)
    assert [(b.line, b.code, b.skip_reason, b.slow_reason) for b in blocks] == [
        (2, "foo(\n", "a fragment", None),
        (12, "x = 1\n", None, None),
        (18, "y = 2\n", None, "a big model"),
    ]


def test_a_subprocess_page_runs_its_blocks_in_order_in_one_namespace_and_reports_the_failing_block(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n<!-- subprocess-test: it registers things -->\n\n```py\nx = 41\n```\n\n"
        "<!-- no-test: a fragment -->\n```py\nfoo(\n```\n\n```py\nx += 1\nraise ValueError(x)\n```\n",
        encoding="utf-8",
    )
    assert subprocess_reason(page) == "it registers things"
    failure = run_in_subprocess(page, tmp_path)
    assert failure is not None
    assert "The example at page.md:14 raised ValueError: 42" in failure
    page.write_text(
        page.read_text(encoding="utf-8").replace("raise ValueError(x)", "assert x == 42"), encoding="utf-8"
    )
    assert run_in_subprocess(page, tmp_path) is None
