"""MkDocs hooks of the documentation site (``mkdocs.yml``): pages that show a file from outside ``docs/``.

``docs/benchmarks.md`` and ``docs/contributing.md`` hold one line, ``--8<-- "benchmarks/README.md"`` and
``--8<-- "CONTRIBUTING.md"``: this hook puts that file's text in its place when the site is built, so each
fact stays in one file of the repository. Its links are relative to where it lives: a link into ``docs/``
becomes a link between pages, and a link to a file the site does not hold (a benchmark's result table,
``benchmarks/results/*.md``) becomes that file's path in the repository, in code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

INCLUDE = re.compile(r'^--8<-- "([^"]+)"\s*$')
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)#\s]*)(#[^)\s]*)?\)")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    match = INCLUDE.match(markdown.strip())
    if match is None:
        return markdown
    repository = Path(config.config_file_path).parent
    source = match.group(1)
    folder = str(Path(source).parent).removeprefix(".")
    folder = f"{folder}/" if folder else ""
    text = (repository / source).read_text()

    def link(found: re.Match) -> str:
        image, label, target, anchor = found.group(1), found.group(2), found.group(3), found.group(4) or ""
        if not target or target.startswith(("http://", "https://", "mailto:")):
            return found.group(0)
        if target.startswith("../docs/"):
            return f"{image}[{label}]({target.removeprefix('../docs/')}{anchor})"
        return f"{label} (`{folder}{target}`)"

    return LINK.sub(link, text)
