"""The documentation holds together in any clone: every relative link in a Markdown file resolves to a
file of the repository (and its `#anchor` to a heading there), no link leaves the repository, and the
README stays short enough to read."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README_MAX_LINES = 500
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`[^`]*`")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def markdown_files() -> list[Path]:
    """Every Markdown file of the repository, outside hidden and virtual-environment directories."""
    return sorted(
        path
        for path in REPO.rglob("*.md")
        if not any(part.startswith(".") or part in ("venv", "node_modules") for part in path.relative_to(REPO).parts)
    )


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, inline code removed (a link target in code is not a link)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(INLINE_CODE.sub("", line))
    return lines


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a file's headings: lower case, punctuation dropped, spaces to hyphens,
    a repeated heading numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    for line in prose_lines(path.read_text()):
        match = HEADING.match(line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(2).replace("`", "").lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            if count:
                seen[f"{slug}-{count}"] = 1
    return set(seen)


def links(path: Path) -> list[str]:
    return [target for line in prose_lines(path.read_text()) for target in LINK.findall(line)]


FILES = markdown_files()


def test_the_documentation_is_found():
    names = {str(path.relative_to(REPO)) for path in FILES}
    assert {"README.md", "CHANGELOG.md", "CONTRIBUTING.md", "bench/README.md", "docs/objective.md"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda path: str(path.relative_to(REPO)))
def test_every_relative_link_resolves(path):
    broken = []
    for target in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # a scheme: checked by the test below
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.is_relative_to(REPO) or not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(target)
    assert not broken, f"{path.relative_to(REPO)}: links that do not resolve: {broken}"


@pytest.mark.parametrize("path", FILES, ids=lambda path: str(path.relative_to(REPO)))
def test_no_link_leaves_the_repository(path):
    text = path.read_text()
    outside = re.findall(r"(?:https?|ftp)://\S+|\.\./shared\S*", text)
    outside += [target for target in links(path) if re.match(r"[a-z][a-z0-9+.-]*:", target)]
    assert not outside, f"{path.relative_to(REPO)} points outside the repository: {outside}"


def test_the_readme_is_short():
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move long topics to docs/"
