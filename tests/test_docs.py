"""The README and docs/ point at things that exist, and the README's commands are ones the CLI accepts."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"(?<![\w./-])((?:configs|benchmarks|clusters|examples|tests|docs|lookahead_ray)/[\w./-]*\w)")
COMMAND = re.compile(r"`(lookahead-ray [^`]+)`")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_and_repository_path_of_a_page_exists(page):
    text = page.read_text()
    assert len(re.findall(r"^```", text, flags=re.M)) % 2 == 0, f"{page.name}: a code block is never closed"
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(target)
    for path in REPO_PATH.findall(text):
        if not (REPO / path).exists():
            broken.append(path)
    assert not broken, f"{page.relative_to(REPO)} names what does not exist: {broken}"


def test_the_readme_links_every_docs_page_and_stays_short():
    readme = (REPO / "README.md").read_text()
    linked = {(REPO / t.partition("#")[0]).resolve() for t in LINK.findall(readme) if not t.startswith("http")}
    assert set(PAGES[1:]) <= linked, sorted(p.name for p in set(PAGES[1:]) - linked)
    assert len(readme.splitlines()) <= 200


def _readme_commands() -> list[str]:
    """Every `lookahead-ray ...` of the README: in its bash blocks (split at `&&`) and inline."""
    readme = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            commands += [part.strip() for part in line.split("#")[0].split("&&")
                         if part.strip().startswith("lookahead-ray ")]
    return commands + COMMAND.findall(readme)


def test_every_command_of_the_readme_is_one_the_cli_accepts():
    from lookahead_ray.cli import build_parser
    from lookahead_ray.config import load_config

    commands = _readme_commands()
    assert any(c.startswith("lookahead-ray demo") for c in commands) and len(commands) >= 8, commands
    parser = build_parser()
    pending = [(command, shlex.split(command)[1:]) for command in commands]
    while pending:
        command, argv = pending.pop()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"the README's `{command}` is refused by the CLI (exit {exc.code})")
        if args.command == "submit":  # the job's own command, after `--`, too
            pending.append((command, [a for a in args.command_args if a != "--"]))
        if getattr(args, "config", None):  # its config loads with its overrides, from the repository root
            load_config(REPO / args.config, list(getattr(args, "overrides", None) or []))
