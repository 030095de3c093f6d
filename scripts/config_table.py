"""Print the README's configuration table from `app.settings.Settings` (the single source of truth).

    python scripts/config_table.py            # print it
    python scripts/config_table.py --write    # replace the table between the markers in README.md
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BEGIN, END = "<!-- config-table:begin -->", "<!-- config-table:end -->"


def table() -> str:
    from pydantic_core import PydanticUndefined

    from app.settings import Settings

    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        if field.default is not PydanticUndefined:
            default = field.default
        elif field.default_factory is not None:
            default = field.default_factory()
        else:
            default = None
        if default is None:  # derived from other settings where the text says how, else not set at all
            shown = "(derived)" if "Default" in (field.description or "") else "(unset)"
        elif default in ("", []):
            shown = "(empty)"
        else:
            shown = f"`{','.join(default) if isinstance(default, list) else default}`"
        text = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `SPAFIT_{name.upper()}` | {shown} | {text} |")
    return "\n".join(rows)


def main() -> None:
    t = table()
    if "--write" in sys.argv:
        readme = ROOT / "README.md"
        text = readme.read_text()
        a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
        readme.write_text(text[:a] + "\n" + t + "\n" + text[b:])
    else:
        print(t)


if __name__ == "__main__":
    main()
