"""HTML building blocks of the report: escaping, notes, tables, embedded images, Markdown.

Everything taken from files is escaped; images are embedded as base64 ``data:`` URIs, so a
page built from these pieces loads nothing.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
from pathlib import Path
from typing import Any

__all__ = [
    "DIRECTION_WORDS",
    "escape",
    "figure_uri",
    "format_cell",
    "image",
    "image_file",
    "markdown_to_html",
    "note",
    "parse_number",
    "read_csv",
    "read_json",
    "table",
]

#: The simulator's directions in words.
DIRECTION_WORDS = {"remove": "remove (healthier)", "inject": "inject (more diseased)"}


def escape(value: Any) -> str:
    """Escaped text of any value."""
    return html.escape(str(value), quote=True)


def note(text: str) -> str:
    """A short escaped note (``<p class="note">``) that stands in for a missing part."""
    return f'<p class="note">{escape(text)}</p>'


def format_cell(value: Any) -> str:
    """A table cell's text: floats to 4 significant digits, None empty."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """An HTML table; numeric cells are right-aligned (``class="num"``)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for value in row:
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            css = ' class="num"' if numeric else ""
            cells.append(f"<td{css}>{escape(format_cell(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _data_uri(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def image_file(path: Path, alt: str, caption: str = "") -> str:
    """``<figure>`` embedding a PNG / GIF file."""
    mime = "image/gif" if path.suffix.lower() == ".gif" else "image/png"
    return image(_data_uri(path.read_bytes(), mime), alt, caption)


def image(uri: str, alt: str, caption: str = "") -> str:
    """``<figure>`` showing the image at ``uri``, with an optional caption."""
    cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{uri}" alt="{escape(alt)}">{cap}</figure>'


def figure_uri(fig: Any, dpi: int = 90) -> str:
    """A matplotlib figure as a PNG data URI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return _data_uri(buffer.getvalue(), "image/png")


def read_json(path: Path | None) -> dict[str, Any] | None:
    """A JSON object file as a dict; None when it is missing, unreadable or not an object."""
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def read_csv(path: Path | None) -> list[dict[str, str]]:
    """The rows of a CSV file as dicts; none when it is missing."""
    if path is None or not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


_INLINE_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*([^*]+)\*\*")
_BULLET = re.compile(r"^\s*[-*]\s+")


def _inline(text: str) -> str:
    """Escape ``text``, then render `code` and **bold**."""
    escaped = escape(text)
    escaped = _INLINE_CODE.sub(r"<code>\1</code>", escaped)
    return _BOLD.sub(r"<strong>\1</strong>", escaped)


_CELL_SEPARATOR = re.compile(r"(?<!\\)\|")


def _split_row(line: str) -> list[str]:
    """Cells of a Markdown table row; ``\\|`` inside a cell is a literal pipe."""
    body = line.strip()
    if body.startswith("|"):
        body = body[1:]
    if body.endswith("|") and not body.endswith("\\|"):
        body = body[:-1]
    return [cell.strip().replace("\\|", "|") for cell in _CELL_SEPARATOR.split(body)]


def markdown_to_html(text: str) -> str:
    """Render the Markdown a benchmark writes (headings, pipe tables, lists, paragraphs).

    Everything is escaped; links and images are kept as text (the report loads nothing).
    """
    out: list[str] = []
    lines = text.splitlines()
    index = 0
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            out.append(f"<p>{_inline(' '.join(paragraph))}</p>")
            paragraph.clear()

    while index < len(lines):
        line = lines[index].rstrip()
        stripped = line.strip()
        if stripped.startswith("|"):
            flush()
            block = []
            while index < len(lines) and lines[index].strip().startswith("|"):
                block.append(_split_row(lines[index]))
                index += 1
            separator = len(block) > 1 and all(
                re.fullmatch(r":?-{1,}:?", cell.replace(" ", "")) for cell in block[1] if cell
            )
            header, rows = (block[0], block[2:]) if separator else ([], block)
            right = [cell.strip().endswith(":") for cell in block[1]] if separator else []

            def cell(tag: str, column: int, value: str, right: list[bool] = right) -> str:
                css = ' class="num"' if column < len(right) and right[column] else ""
                return f"<{tag}{css}>{_inline(value)}</{tag}>"

            head = "".join(cell("th", i, c) for i, c in enumerate(header))
            body = "".join(
                "<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>"
                for row in rows
            )
            thead = f"<thead><tr>{head}</tr></thead>" if header else ""
            out.append(f"<table>{thead}<tbody>{body}</tbody></table>")
            continue
        heading = re.match(r"^(#{1,6})\s+(.*)$", stripped)
        if heading:
            flush()
            level = min(6, len(heading.group(1)) + 2)
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif re.match(r"^[-*]\s+", stripped):
            flush()
            items = []
            while index < len(lines) and _BULLET.match(lines[index]):
                item = _BULLET.sub("", lines[index])
                items.append(f"<li>{_inline(item)}</li>")
                index += 1
            out.append(f"<ul>{''.join(items)}</ul>")
            continue
        elif not stripped:
            flush()
        else:
            paragraph.append(stripped)
        index += 1
    flush()
    return "\n".join(out)


def parse_number(text: str) -> Any:
    """A CSV cell as int / float when it is one, else the text."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text
