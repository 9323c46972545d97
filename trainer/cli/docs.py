"""`trainer --docs WORD`: the sections of the docs pages that mention WORD (case-insensitive), most mentions
first. The pages travel inside the wheel as trainer/_docs (pyproject.toml); a source checkout or an editable
install reads the repository's docs/. Exit code 0 when something matched, 1 when nothing did (as grep)."""

import re
from pathlib import Path

SHOWN = 5  # sections printed whole; the rest are listed by page and heading
HEADING = re.compile(r"#{1,6} ")


def docs_folder() -> Path | None:
    package = Path(__file__).resolve().parent.parent
    return next((d for d in (package / "_docs", package.parent / "docs") if d.is_dir()), None)


def sections(page: Path) -> list[tuple[str, str]]:
    """(heading, text) of every section: a heading line and what follows it up to the next heading of any
    level; lines in code blocks are never headings (a shell comment starts with #)."""
    found: list[tuple[str, list[str]]] = []
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        fenced ^= line.startswith("```")
        if not fenced and HEADING.match(line):
            found.append((line.lstrip("#").strip(), []))
        if found:
            found[-1][1].append(line)
    return [(heading, "\n".join(lines).strip()) for heading, lines in found]


def search(word: str | None) -> tuple[str, int]:
    """What to print, and the exit code."""
    folder = docs_folder()
    pages = sorted(folder.glob("*.md")) if folder else []
    if not pages:
        return "the docs pages are not in this installation: reinstall guarded-trainer", 1
    width = max(len(p.name) for p in pages)
    titles = "".join(f"\n  {p.name:<{width}}  {(sections(p) or [(p.stem, '')])[0][0]}" for p in pages)
    if not word:
        return f"usage: trainer --docs WORD (the sections that mention it); the pages in {folder}:{titles}", 0
    needle = word.lower()
    hits = []  # (-score, page order, section order, page, heading, text, mentions)
    for i, page in enumerate(pages):
        for j, (heading, text) in enumerate(sections(page)):
            count = text.lower().count(needle)
            if count:
                score = count + 10 * (needle in heading.lower())  # a heading about WORD comes first
                hits.append((-score, i, j, page, heading, text, count))
    if not hits:
        return f"no docs page mentions {word!r}; the pages in {folder}:{titles}", 1
    hits.sort(key=lambda hit: hit[:3])
    out = [f"── {page.name} § {title} ({n}x)\n{text}" for *_, page, title, text, n in hits[:SHOWN]]
    if rest := hits[SHOWN:]:
        out.append("also: " + "; ".join(f"{page.name} § {title}" for *_, page, title, _, _ in rest))
    return "\n\n".join(out), 0
