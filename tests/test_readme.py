"""The README's commands run, in order, on a fresh copy of the repository.

Every line of the ```bash blocks of the README's "Quick start" and "Command line" sections runs in a temporary copy of
the working tree (tracked and untracked files, as a fresh clone would have them after this commit), each after the
ones before it, so a command that reads ``runs/x`` needs an earlier line that writes it. The test shrinks each run
without editing the README: it appends the tiny settings a command's ``--help`` offers (a slice of the training and
evaluation rows, one epoch, a small ViT), unless the line sets them itself. Lines that publish to the Hub
(``--push-to-hub``) are skipped: they need a network and a token. The "Recipes" section's commands run the same way
in a slow test.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TINY_VIT = "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64,patch_size=8"
# (spellings of one setting, value): the first spelling a command's --help lists is appended
TINY_SETTINGS = [
    (("--max_train_samples", "--max-train-samples", "--max-train-rows"), "64"),
    (("--max_eval_samples", "--max-eval-samples", "--max-eval-rows"), "32"),
    (("--num_train_epochs", "--num-train-epochs", "--epochs"), "1"),
    (("--defense_epochs", "--defense-epochs"), "1"),
    (("--clean_samples", "--clean-samples"), "64"),
    (("--config_overrides", "--config-overrides"), TINY_VIT),
]
SKIPPED = ("--push-to-hub",)
COMMAND_TIMEOUT_S = 1200


def bash_lines(section: str) -> list[str]:
    """The commands of the ```bash blocks under the README heading ``section`` (up to the next ``## `` heading),
    continuation lines joined, comment lines dropped."""
    text = README.read_text()
    match = re.search(rf"^## {re.escape(section)}\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S | re.I)
    assert match, f"README.md has no '## {section}' section"
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```", match.group(1), flags=re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                lines.append(line.strip())
    return lines


def _help_command(words: list[str]) -> list[str]:
    """The command that prints the --help of what ``words`` runs (the script of ``accelerate launch``, the
    subcommand of ``hf-backdoor``)."""
    if words[:2] == ["accelerate", "launch"]:
        script = next(w for w in words[2:] if w.endswith(".py"))
        return [sys.executable, script, "--help"]
    if words[0] in ("python", "python3"):
        return [sys.executable, words[1], "--help"]
    if words[0] == "hf-backdoor":
        return [words[0], next(w for w in words[1:] if not w.startswith("-")), "--help"]
    return [words[0], "--help"]


@cache
def _offered_flags(help_command: tuple[str, ...], cwd: str) -> frozenset[str]:
    shown = subprocess.run(list(help_command), capture_output=True, text=True, cwd=cwd, env=_env())
    return frozenset(re.findall(r"(?<![\w-])(--[\w-]+)", shown.stdout))


def shrunk(line: str, cwd: Path) -> list[str]:
    """``line`` as words (its trailing comment dropped) with the tiny settings its --help offers appended."""
    words = shlex.split(line, comments=True)
    offered = _offered_flags(tuple(_help_command(words)), str(cwd))
    for spellings, value in TINY_SETTINGS:
        if not any(w.split("=")[0] in spellings for w in words):
            flag = next((s for s in spellings if s in offered), None)
            if flag is not None:
                words += [flag, value]
    return words


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def fresh_copy(destination: Path) -> Path:
    """The working tree's tracked and untracked (not ignored) files, copied to ``destination``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def run_in_order(lines: list[str], cwd: Path) -> None:
    for line in lines:
        if any(marker in line for marker in SKIPPED):
            continue
        words = shrunk(line, cwd)
        done = subprocess.run(words, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        assert done.returncode == 0, (
            f"`{shlex.join(words)}` exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )


def test_the_quick_start_leads_with_the_defense_recipe():
    """The README's main job is the defense (clean / undefended / BTU with the ASR floor), not the attack alone."""
    first = bash_lines("Quick start")[0]
    assert shlex.split(first, comments=True) == ["accelerate", "launch", "recipes/sst2_btu.py"]


def test_shrinking_appends_only_the_settings_a_command_offers(tmp_path):
    words = shrunk("accelerate launch recipes/sst2_btu.py --num_train_epochs 2  # three runs", ROOT)
    assert words[:5] == ["accelerate", "launch", "recipes/sst2_btu.py", "--num_train_epochs", "2"]
    assert words[5:] == ["--max_train_samples", "64", "--max_eval_samples", "32"]  # no ViT settings for text
    assert "--config_overrides" in shrunk("python recipes/cifar10_vit.py", ROOT)


def test_quick_start_and_command_line_run_in_order_on_a_fresh_copy(tmp_path):
    lines = bash_lines("Quick start") + bash_lines("Command line")
    assert lines
    run_in_order(lines, fresh_copy(tmp_path))


@pytest.mark.slow
def test_recipe_commands_run_on_a_fresh_copy(tmp_path):
    run_in_order(bash_lines("Recipes"), fresh_copy(tmp_path))
