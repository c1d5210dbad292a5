"""scripts/check-breaking in throwaway git repositories: it catches a breaking proto change
against the previous commit, lets compatible ones pass, skips when there is no history,
and fails on a REF given that names no commit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CANCEL_PROTO = Path("protos/orders/v1/order_command_service.proto")


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        timeout=60,
    )


def commit_all(repo: Path, message: str) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)


def check(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # buf comes with the dev tools, in the bin directory of the environment running the tests
    # (not necessarily .venv).
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        ["scripts/check-breaking", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def edit(repo: Path, old: str, new: str) -> None:
    path = repo / CANCEL_PROTO
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("protos", "third_party"):
        shutil.copytree(ROOT / name, repo / name)
    (repo / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts" / "check-breaking", repo / "scripts")
    shutil.copy2(ROOT / "buf.yaml", repo)
    git(repo, "init", "-q")
    commit_all(repo, "first")
    return repo


def test_first_commit_has_nothing_to_compare_and_passes(repo: Path) -> None:
    result = check(repo)
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stdout


def test_renaming_a_field_fails_against_the_previous_commit(repo: Path) -> None:
    edit(repo, "string reason = 3;", "string cancel_reason = 3;")
    commit_all(repo, "rename a field")
    result = check(repo)
    assert result.returncode != 0
    assert "reason" in result.stdout + result.stderr


def test_adding_a_field_passes(repo: Path) -> None:
    edit(repo, "string reason = 3;", "string reason = 3;\n  string note = 4;")
    commit_all(repo, "add a field")
    result = check(repo)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "compatible" in result.stdout


def shallow_clone(repo: Path, clone: Path) -> Path:
    """``repo`` cloned with its last commit only."""
    subprocess.run(
        ["git", "clone", "-q", "--depth", "1", f"file://{repo}", str(clone)],
        check=True,
        timeout=60,
    )
    return clone


def test_a_shallow_clone_without_the_previous_commit_skips(repo: Path, tmp_path: Path) -> None:
    edit(repo, "string reason = 3;", "string cancel_reason = 3;")
    commit_all(repo, "rename a field")
    clone = shallow_clone(repo, tmp_path / "clone")
    result = check(clone)
    assert result.returncode == 0, result.stderr
    assert "shallow" in result.stdout


def test_a_ref_given_that_names_no_commit_fails(repo: Path) -> None:
    edit(repo, "string reason = 3;", "string reason = 3;\n  string note = 4;")
    commit_all(repo, "add a field")
    result = check(repo, "nope-ref")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "nope-ref: there is no such commit" in result.stderr


def test_a_ref_given_in_a_shallow_clone_without_it_fails(repo: Path, tmp_path: Path) -> None:
    edit(repo, "string reason = 3;", "string reason = 3;\n  string note = 4;")
    commit_all(repo, "add a field")
    clone = shallow_clone(repo, tmp_path / "clone")
    result = check(clone, "HEAD~1")
    assert result.returncode == 2
    assert "shallow" in result.stderr
