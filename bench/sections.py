"""Named `## ` sections of the results markdown files that several scripts share: each
script rewrites its own section and keeps the others (bench/perf.py writes PERF.md's head,
bench/stress.py its "Robustness" section)."""
from __future__ import annotations

from pathlib import Path


def split_sections(text: str) -> tuple[str, dict[str, str]]:
    """(text before the first `## `, {title: body including its heading line})."""
    head, sections, title = [], {}, None
    for line in text.splitlines(keepends=True):
        if line.startswith("## "):
            title = line[3:].strip()
            sections[title] = line
        elif title is None:
            head.append(line)
        else:
            sections[title] += line
    return "".join(head), sections


def replace_section(path: Path, title: str, body: str) -> None:
    """Set section `title` of `path` (created if missing) to `body`, keeping the rest."""
    from qbench.atomic import atomic_write_text

    path = Path(path)
    head, sections = split_sections(path.read_text() if path.exists() else "")
    sections[title] = f"## {title}\n\n{body.strip()}\n\n"
    atomic_write_text(path, head + "".join(sections.values()))


def keep_sections(path: Path, new_head: str, titles: list[str]) -> str:
    """`new_head` followed by the named sections of the existing file (those that exist)."""
    path = Path(path)
    _, sections = split_sections(path.read_text() if path.exists() else "")
    return new_head.rstrip("\n") + "\n\n" + "".join(sections[t] for t in titles if t in sections)
