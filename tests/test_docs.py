"""The docs pages: `trainer --docs WORD` finds their sections (from a source checkout and from the wheel), and
what they name exists: linked files and headings, config groups and options, `+exp=NAME`, modules, scripts
and paths of this repository."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import REPO, cli_env, run_cli

PAGES = sorted((REPO / "docs").glob("*.md"))
TEXTS = {path: path.read_text(encoding="utf-8") for path in [REPO / "README.md", *PAGES]}
CONF_ROOTS = (REPO / "conf", REPO / "tests" / "own_task" / "conf")
GROUPS = sorted(p.name for p in (REPO / "conf").iterdir() if p.is_dir())
ROOTS = ("trainer", "conf", "scripts", "tests", "slurm", "hydra_plugins", "docs")
# Named like paths of the repository, but not in it: where the wheel puts conf/, slurm/, docs/; a W&B axis.
NOT_PATHS = {"trainer/conf", "trainer/slurm", "trainer/_docs", "trainer/global_step"}


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code (where `[x](y)` is no link)."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"(?ms)^```.*?^```", "", text))


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"(?m)^#{1,6} (.+)$", re.sub(r"(?ms)^```.*?^```", "", text))
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def mentions(pattern: str) -> list[tuple[str, str]]:
    """(page, match) of every match in README.md and docs/*.md, code included; lines of example errors
    (`error: exp=gan9000 ...`) are left out, as they name wrong input on purpose."""
    return [
        (path.name, match)
        for path, text in TEXTS.items()
        for line in text.splitlines()
        if not line.lstrip().startswith("error:")
        for match in re.findall(pattern, line)
    ]


def runnable(module: str) -> bool:
    """`python -m trainer.replay`: a module file, or a package with a __main__."""
    base = REPO / module.replace(".", "/")
    return base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()


def test_docs_print_the_sections_that_mention_a_word(home: Path) -> None:
    found = run_cli("--docs", "RollBack", home=home, timeout=60)
    assert found.returncode == 0, found.stderr
    first = found.stdout.splitlines()[0]
    assert first.startswith("── divergence.md § Actions")  # the most mentions, case-insensitive
    assert "`rollback`: drop the update" in found.stdout and "rollback.max_rollbacks" in found.stdout
    assert found.stdout.count("\n── ") <= 4  # five sections in full; the rest by name
    assert "\nalso: " in found.stdout


def test_docs_without_a_match_list_the_pages_and_exit_1(home: Path) -> None:
    """Exit code 1, as grep's: nothing found is no error, but a script can tell."""
    missing = run_cli("--docs", "zzq-nowhere", home=home, timeout=60)
    assert missing.returncode == 1
    assert missing.stdout.startswith(f"no docs page mentions 'zzq-nowhere'; the pages in {REPO / 'docs'}:")
    assert all(f"\n  {page.name}" in missing.stdout for page in PAGES)
    usage = run_cli("--docs", home=home, timeout=60)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: trainer --docs WORD")


def test_the_wheel_carries_the_docs_and_searches_them_there(tmp_path: Path, home: Path) -> None:
    from hatchling.builders.wheel import WheelBuilder

    (wheel,) = WheelBuilder(str(REPO)).build(directory=str(tmp_path / "dist"), versions=["standard"])
    with zipfile.ZipFile(wheel) as archive:
        assert {f"trainer/_docs/{page.name}" for page in PAGES} <= set(archive.namelist())
        archive.extractall(tmp_path / "site")
    env = {**cli_env(home), "PYTHONPATH": str(tmp_path / "site")}  # the unpacked wheel, not the repository
    done = subprocess.run(
        [sys.executable, "-m", "trainer", "--docs", "zzq-nowhere"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and f"the pages in {tmp_path / 'site' / 'trainer' / '_docs'}:" in done.stdout


@pytest.mark.parametrize("page", TEXTS, ids=lambda path: path.name)
def test_relative_links_point_to_files_and_headings_that_exist(page: Path) -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(TEXTS[page])):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (page.parent / file).resolve() if file else page
        assert linked.exists(), f"{page.name}: {target} links to a file that does not exist"
        if anchor:
            assert anchor in anchors(linked.read_text(encoding="utf-8")), f"{page.name}: no heading #{anchor}"


def test_every_page_is_linked_from_the_readme() -> None:
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", TEXTS[REPO / "README.md"]))
    assert linked == {page.name for page in PAGES}


def test_experiments_and_group_options_named_in_the_docs_exist() -> None:
    def exists(group: str, option: str) -> bool:  # in conf/, or the own task's (tests/own_task/conf)
        return any((root / group / f"{option}.yaml").is_file() for root in CONF_ROOTS)

    exps = mentions(r"\+exp=([a-z][a-z0-9_]*)")
    assert exps
    assert not (missing := [(page, name) for page, name in exps if not exists("exp", name)]), missing
    # `trainer=gpu`, `launcher=ray`, `data=hub`: not `launcher.strategy=fsdp` or `hydra/launcher=...`
    options = mentions(rf"(?<![\w./+~-])({'|'.join(GROUPS)})=([a-z][a-z0-9_]*)")
    assert options
    assert not (missing := [(page, f"{g}={o}") for page, (g, o) in options if not exists(g, o)]), missing


def test_modules_scripts_and_paths_named_in_the_docs_exist() -> None:
    modules = mentions(r"python -m (trainer(?:\.\w+)*)")
    missing = [(page, module) for page, module in modules if not runnable(module)]
    assert modules and not missing, missing
    paths = mentions(rf"(?<![\w./-])((?:{'|'.join(ROOTS)})/[\w./*-]*)")
    named = [(page, path.rstrip(".,:")) for page, path in paths if path.rstrip(".,:") not in NOT_PATHS]
    missing = [(page, path) for page, path in named if not list(REPO.glob(path.rstrip("/")))]
    assert named and not missing, missing


def test_the_layout_page_lists_every_module_of_the_package() -> None:
    """docs/layout.md is the one place that lists the modules: each, with its folder (`tasks/base.py`)."""
    package = REPO / "trainer"
    modules = {
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if path.name != "__init__.py" or path.parent == package  # (a subpackage's __init__ is its folder)
    }
    listed = re.findall(r"`((?:\w+/)*\w+\.py)`", TEXTS[REPO / "docs" / "layout.md"])
    listed_modules = {name.removeprefix("trainer/") for name in listed}
    assert not (modules - listed_modules), f"not in docs/layout.md: {sorted(modules - listed_modules)}"
    assert not (listed_modules - modules), f"no such module: {sorted(listed_modules - modules)}"
