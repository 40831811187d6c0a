"""Rewrite pyproject.toml's ``[tool.flwr.app.config]`` from fedapp's config models (the one source of defaults).

    python scripts/write_defaults.py          # after changing a default in fedapp/config.py
"""

from __future__ import annotations

from pathlib import Path

from fedapp.config import defaults_table

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
HEADER = "[tool.flwr.app.config]"


def rewritten(text: str) -> str:
    """``text`` with the table replaced; it must be the file's last table."""
    head, sep, _ = text.partition(HEADER)
    if not sep:
        raise SystemExit(f"{PYPROJECT}: no {HEADER} table")
    return head + defaults_table()


if __name__ == "__main__":
    PYPROJECT.write_text(rewritten(PYPROJECT.read_text()))
    print(f"wrote {HEADER} of {PYPROJECT}")
