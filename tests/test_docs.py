"""The README and docs/: relative links resolve, the README stays a short manual (issue #26)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
README_LIMIT = 12 * 1024  # bytes: a newcomer reads it whole; measurements go to docs/

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def prose(text: str) -> str:
    """The text without code: a link written inside code is an example, not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def anchors(path: Path) -> set[str]:
    """Heading anchors as GitHub renders them (lower case, punctuation dropped, - for spaces)."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # a link's text only
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")  # GitHub numbers repeated headings
    return out


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path.read_text())) if not EXTERNAL.match(t)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target in relative_links(doc):
        name, _, anchor = target.partition("#")
        dest = (doc.parent / name).resolve() if name else doc
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, f"{doc.relative_to(REPO)} has broken links:\n" + "\n".join(broken)


def test_readme_stays_within_12_kb() -> None:
    size = len(README.read_bytes())
    assert size <= README_LIMIT, (f"README.md is {size} bytes, over {README_LIMIT}: move "
                                  f"measurements and history to docs/ and link them")


def test_readme_starts_with_the_two_commands() -> None:
    block = re.search(r"^```[^\n]*\n(.*?)^```", README.read_text(), re.S | re.M)
    assert block, "README.md has no code block"
    commands = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]
    assert [c for c in commands if c] == ["make run", "make test"]


def test_anchor_slugs_follow_github(tmp_path: Path) -> None:
    """The slug rule the link test relies on: code, punctuation and repeats as GitHub has them."""
    doc = tmp_path / "doc.md"
    doc.write_text("# Measured on this machine (2 CPU cores)\n## Crop training (`vae.crop`)\n"
                   "## Evaluate: what it reaches\n## Notes\n## Notes\n```\n# not a heading\n```\n")
    assert anchors(doc) == {"measured-on-this-machine-2-cpu-cores", "crop-training-vaecrop",
                            "evaluate-what-it-reaches", "notes", "notes-1"}
