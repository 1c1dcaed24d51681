"""Keep numpy-style ``Returns`` sections as free text (from cookiecutter-scverse / scanpy).

Our docstrings describe what is returned in prose, often with a definition list of the
``.obsm``/``.uns`` keys written. Napoleon would read the first line as a type; this keeps the
section as written and turns ``name : type`` lines into ``name`` (:class:`type`).
"""

from __future__ import annotations

import re
from collections.abc import Generator, Iterable

from sphinx.application import Sphinx
from sphinx.ext.napoleon import NumpyDocstring


def _process_return(lines: Iterable[str]) -> Generator[str, None, None]:
    for line in lines:
        if m := re.fullmatch(r"(?P<param>\w+)\s+:\s+(?P<type>[\w.]+)", line):
            yield f"-{m['param']} (:class:`~{m['type']}`)"
        else:
            yield line


def _parse_returns_section(self: NumpyDocstring, section: str) -> list[str]:
    lines_raw = self._dedent(self._consume_to_next_section())
    if lines_raw and lines_raw[0] == ":":
        del lines_raw[0]
    lines = self._format_block(":returns: ", list(_process_return(lines_raw)))
    if lines and lines[-1]:
        lines.append("")
    return lines


def setup(app: Sphinx) -> dict[str, bool]:
    """Patch napoleon's numpy-style ``Returns`` parser."""
    NumpyDocstring._parse_returns_section = _parse_returns_section
    return {"parallel_read_safe": True, "parallel_write_safe": True}
