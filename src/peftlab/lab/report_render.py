"""The report as a list of blocks (heading, paragraph, preformatted text, table, image) and its two renderings:
Markdown (images linked from a folder next to it) and one self-contained HTML page.

The HTML holds no script and no external resource: images are ``data:image/png;base64`` URIs, the CSS is inline,
even the favicon is an empty data URI (so a browser requests nothing). Every piece of text, including model
outputs that may contain ``<`` or ``&``, goes through :func:`html.escape` (attribute values quoted too); in Markdown,
``[`` and ``]`` are escaped as well, so no data can form a link or a remote image.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from urllib.parse import quote


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str


@dataclass
class Pre:
    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    best: set[tuple[int, int]] = field(default_factory=set)  # (row, column) cells marked as the column's best
    css: str = ""


@dataclass
class Image:
    name: str  # file name in the Markdown report's image folder
    png: bytes
    caption: str


Block = Heading | Para | Pre | Table | Image

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1250px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.best { background: #e3f3e6; }
table.summary td { white-space: nowrap; }
table.samples td { white-space: pre-wrap; max-width: 900px; }
.wide { overflow-x: auto; }
pre { background: #f6f8fa; padding: 8px; white-space: pre-wrap; word-break: break-word; font-size: 12px; }
figure { margin: 1.2em 0; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption, .note { font-size: 12px; color: #555; }
nav li { margin: 2px 0; }
"""


def slug(text: str) -> str:
    """A lowercase ASCII identifier for anchors and file names."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def _md_text(text: str) -> str:
    """Text from data, generations or configs as inert Markdown: no HTML (``<`` escaped) and no link or image
    (``[`` and ``]`` escaped), so ``![x](https://tracker)`` in a dataset cannot make a viewer fetch anything."""
    return html.escape(text, quote=False).replace("[", "\\[").replace("]", "\\]")


def _md_cell(text: str, best: bool) -> str:
    cell = _md_text(text).replace("|", "\\|").replace("\r", "").replace("\n", "<br>")
    return f"**{cell}**" if best and cell else cell


def to_markdown(blocks: list[Block], files_dir: str) -> str:
    """Markdown; images as links ``files_dir/<name>`` (the caller writes the PNGs there)."""
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append("#" * block.level + " " + _md_text(block.text))
        elif isinstance(block, Para):
            out.append(_md_text(block.text))
        elif isinstance(block, Pre):
            longest = max((len(run) for run in re.findall(r"`+", block.text)), default=0)
            fence = "`" * max(3, longest + 1)  # a fence longer than any backtick run inside cannot be closed early
            out.append(f"{fence}\n{block.text}\n{fence}")
        elif isinstance(block, Table):
            lines = ["| " + " | ".join(_md_cell(h, False) for h in block.headers) + " |",
                     "|" + "|".join("---" for _ in block.headers) + "|"]
            lines += ["| " + " | ".join(_md_cell(c, (r, i) in block.best) for i, c in enumerate(row)) + " |"
                      for r, row in enumerate(block.rows)]
            out.append("\n".join(lines))
        else:
            caption = _md_text(block.caption)
            # The name may come from a file in the results folder: percent-encoded, it cannot end the link early.
            out.append(f"![{caption}]({quote(files_dir)}/{quote(block.name)})\n\n*{caption}*")
    return "\n\n".join(out) + "\n"


def _html_table(block: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
    rows = []
    for r, row in enumerate(block.rows):
        cells = [f'<td class="best"><strong>{html.escape(c)}</strong></td>' if (r, i) in block.best
                 else f"<td>{html.escape(c)}</td>" for i, c in enumerate(row)]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    css = f' class="{html.escape(block.css)}"' if block.css else ""
    return (f'<div class="wide"><table{css}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n' + "\n".join(rows)
            + "\n</tbody>\n</table></div>")


def to_html(blocks: list[Block], title: str) -> str:
    """One valid, self-contained HTML5 document with a table of contents of the level-2 headings."""
    body, toc, used = [], [], set()
    for block in blocks:
        if isinstance(block, Heading):
            anchor, k = slug(block.text), 1
            while anchor in used:
                anchor, k = f"{slug(block.text)}-{k}", k + 1
            used.add(anchor)
            body.append(f'<h{block.level} id="{anchor}">{html.escape(block.text)}</h{block.level}>')
            if block.level == 2:
                toc.append(f'<li><a href="#{anchor}">{html.escape(block.text)}</a></li>')
        elif isinstance(block, Para):
            body.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Pre):
            body.append(f"<pre>{html.escape(block.text)}</pre>")
        elif isinstance(block, Table):
            body.append(_html_table(block))
        else:
            data = base64.b64encode(block.png).decode("ascii")
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(block.caption)}">'
                        f"<figcaption>{html.escape(block.caption)}</figcaption></figure>")
    nav = f"<nav><ul>\n{chr(10).join(toc)}\n</ul></nav>" if toc else ""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<link rel="icon" href="data:,">\n<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n'
            f"<body>\n<main>\n" + (body[0] if body else "") + f"\n{nav}\n" + "\n".join(body[1:])
            + "\n</main>\n</body>\n</html>\n")
