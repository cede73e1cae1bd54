"""DEPLOYMENT.md: every alert of deploy/prometheus/alerts.yml is listed with a link to its runbook
section, every relative link resolves (file and heading), the README points at the guide, and the
spot for the image section is there."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "DEPLOYMENT.md"


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_every_relative_link_resolves() -> None:
    for target in links(GUIDE):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = ROOT / file if file else GUIDE
        assert path.exists(), target
        if anchor:
            assert anchor in anchors(path), target


def test_every_alert_has_a_row_and_a_runbook_section() -> None:
    groups = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"]
    names = [rule["alert"] for group in groups for rule in group["rules"]]
    text = GUIDE.read_text()
    runbook = anchors(ROOT / "deploy" / "README.md")
    for name in names:
        row = re.search(rf"^\| `{name}` \|.*$", text, flags=re.M)
        assert row, f"{name} is not in DEPLOYMENT.md's alert table"
        assert f"(deploy/README.md#{name.lower()})" in row.group(0), name
        assert name.lower() in runbook, f"deploy/README.md has no runbook section for {name}"


def test_the_readme_points_at_the_guide_and_the_images_spot_is_kept() -> None:
    assert "](DEPLOYMENT.md)" in (ROOT / "README.md").read_text()
    text = GUIDE.read_text()
    assert text.count("<!-- images -->") == 1
    images = text.index("## Images")
    assert images < text.index("<!-- images -->") < text.index("## Alerts")
