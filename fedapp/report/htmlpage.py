"""``fedapp report --html``: the Markdown report as one HTML file that a browser opens on its own.

The page is ``report.md`` rendered by the ``markdown`` package, so what the report says is decided
in one place (:mod:`fedapp.report.markdown`) and the two never drift apart. Every local image and
every linked local PNG is inlined as a base64 data URI: the file can be mailed, attached to an
issue or moved out of its folder and still shows every figure.
"""

from __future__ import annotations

import base64
import html
import mimetypes
import re
from pathlib import Path
from urllib.parse import unquote

import markdown

_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em;
       color: #1b1f23; background: #fff; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #c8ccd0; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f2f4; }
img { max-width: 100%; height: auto; }
code { background: #f0f2f4; padding: 0 3px; border-radius: 3px; }
h1, h2 { border-bottom: 1px solid #e1e4e8; padding-bottom: 0.2em; }
"""

_LOCAL_REF = re.compile(r'(?P<attr>\b(?:src|href))="(?P<target>[^"]+)"')
_INLINED = ("image/",)  # what becomes a data URI; other links stay as they are


def _data_uri(path: Path) -> str | None:
    kind = mimetypes.guess_type(path.name)[0]
    if kind is None or not kind.startswith(_INLINED) or not path.is_file():
        return None
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def inline_local_files(body: str, folder: Path) -> str:
    """``src``/``href`` values naming local image files (relative to ``folder``) become data URIs.

    URLs with a scheme or an anchor, and files that are gone, are left alone. A linked image gets a
    ``download`` name, since browsers refuse to open a data URI as a page of its own.
    """

    def replace(match: re.Match[str]) -> str:
        target = html.unescape(match["target"])
        if ":" in target or target.startswith("#"):
            return match[0]
        path = folder / unquote(target)
        uri = _data_uri(path)
        if uri is None:
            return match[0]
        extra = f' download="{html.escape(path.name)}"' if match["attr"] == "href" else ""
        return f'{match["attr"]}="{uri}"{extra}'

    return _LOCAL_REF.sub(replace, body)


def render_html(text: str, folder: Path, title: str = "FedDiffuse run report") -> str:
    """A whole HTML page of Markdown ``text`` whose relative links point into ``folder``."""
    body = markdown.markdown(text, extensions=["tables", "sane_lists"], output_format="html")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            f"{inline_local_files(body, folder)}\n</body>\n</html>\n")


def write_html(report: Path) -> Path:
    """``report.html`` beside ``report.md`` (what :func:`fedapp.report.markdown.write_report` returned)."""
    path = report.with_suffix(".html")
    path.write_text(render_html(report.read_text(encoding="utf-8"), report.parent), encoding="utf-8")
    return path
