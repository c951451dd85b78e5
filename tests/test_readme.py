"""The README is a newcomer's page: at most 200 lines, and its commands run as written.

Every line of the README's fenced bash blocks is either run here (in a fresh folder where `facemark/` points at
this checkout's package folder, so the README's relative paths resolve and the outputs land in a temporary
folder) or skipped by one of SKIPS, which says why. A command that fits neither fails the test, so a new README
command must be classified. The Python block runs as a script in the same kind of folder. The links of the README
and docs/ must point at files and headings that exist, and no working-log wording may appear in them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_LINES = 200
TIMEOUT_S = 120

# (what a command starts with or contains, why it is not run here)
SKIPS: list[tuple[str, str]] = [
    ("make ", "builds virtual environments with pip (network, minutes); `make test` is what runs this file"),
    ("pip ", "installs packages (network)"),
    ("../shared", "needs the training data outside the repository"),
    ("facemark train", "trains a model (torch, data, minutes)"),
    ("facemark evaluate", "needs labelled data (../shared/data)"),
    ("facemark export", "needs a checkpoint and torch"),
    ("facemark bench", "minutes of timing, torch and data"),
    ("facemark serve", "starts a long-running server (extra serve)"),
    ("--server", "needs a running `facemark serve`"),
    ("--model runs/", "needs a model the user trained and exported (the README's lines above it)"),
]
RUNNABLE = ("facemark ", "python -m facemark")


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def readme_commands() -> list[str]:
    commands = []
    for block in fenced_blocks(README.read_text(encoding="utf-8"), "bash"):
        for line in block.splitlines():
            command = re.split(r"\s+#\s", line, maxsplit=1)[0].strip()  # drop a trailing "  # comment"
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def skip_reason(command: str) -> str | None:
    for key, reason in SKIPS:
        if command.startswith(key) or (key.startswith(("-", ".")) and key in command):
            return reason
    return None


def sandbox(tmp_path: Path) -> Path:
    """A folder in which `facemark/...` paths resolve to this checkout's package folder."""
    (tmp_path / "facemark").symlink_to(ROOT / "facemark", target_is_directory=True)
    return tmp_path


def run_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's `facemark`
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"README.md has {lines} lines (at most {MAX_LINES}): move details to docs/"


def test_readme_commands_are_all_classified():
    commands = readme_commands()
    assert any(c.startswith(RUNNABLE) and skip_reason(c) is None for c in commands), "no README command is run"
    unknown = [c for c in commands if skip_reason(c) is None and not c.startswith(RUNNABLE)]
    assert not unknown, f"README commands neither run nor skipped with a reason (extend SKIPS): {unknown}"


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs(command, tmp_path):
    reason = skip_reason(command)
    if reason:
        pytest.skip(reason)
    if not command.startswith(RUNNABLE):
        pytest.fail(f"unclassified README command: {command}")
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=sandbox(tmp_path), env=run_env(),
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    output = f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert result.returncode == 0, f"{command}\nexit {result.returncode}\n{output}"


def test_readme_python_example_runs(tmp_path):
    blocks = fenced_blocks(README.read_text(encoding="utf-8"), "python")
    assert blocks, "the README has no Python example"
    folder = sandbox(tmp_path)
    for number, code in enumerate(blocks):
        script = folder / f"readme_example_{number}.py"
        script.write_text(code, encoding="utf-8")
        result = subprocess.run([sys.executable, script.name], cwd=folder, env=run_env(), capture_output=True,
                                text=True, timeout=TIMEOUT_S)
        assert result.returncode == 0, f"README Python block {number}:\n{code}\n{result.stderr[-3000:]}"
        assert "Pose(" in result.stdout, result.stdout  # the example found faces and printed them


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {github_anchor(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_links_point_at_files_and_headings(path):
    text = path.read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no such heading")
    assert not broken, f"{path.name}: {broken}"


WORKING_LOG = re.compile(r"this session|last session|previous session|session before|next session|session's", re.I)


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_docs_describe_the_product_not_a_working_log(path):
    hits = [line for line in path.read_text(encoding="utf-8").splitlines() if WORKING_LOG.search(line)]
    assert not hits, f"{path.name}: name the model or the date instead of the working log: {hits[:5]}"
