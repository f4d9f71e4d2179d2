"""The Python examples of the README and docs/ run as written (in a scratch directory).

A docs/ block is an example when it prints (the others show signatures)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

BLOCKS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
DOC_BLOCKS = [
    (path.name, block)
    for path in sorted((REPO / "docs").glob("*.md"))
    for block in re.findall(r"```python\n(.*?)```", path.read_text(), re.S)
    if "print(" in block
]


def test_readme_has_python_examples():
    assert BLOCKS


@pytest.mark.parametrize("code", BLOCKS, ids=lambda c: c.splitlines()[0])
def test_readme_python_example_runs(code, tmp_path, monkeypatch, one_thread, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    assert "test error" in capsys.readouterr().out


@pytest.mark.parametrize("name,code", DOC_BLOCKS, ids=[n for n, _ in DOC_BLOCKS])
def test_docs_python_example_runs(name, code, tmp_path, monkeypatch, one_thread, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, name, "exec"), {"__name__": "__docs__"})
    assert capsys.readouterr().out.strip()


# -- shell blocks ---------------------------------------------------------------------------
# Every ```sh block's fflab and torchrun commands run, in order, on small settings: training
# sees 300 images for one epoch and is tested on 300. What cannot run here is listed: the
# make targets (make test is this suite, make demo is a train command that runs below), CUDA
# and multi-machine lines without the hardware, and benchmarks (not tests).
SMALL = ["--epochs", "1", "--set", "data.train_subset=300", "--set", "data.test_subset=300"]


def shell_commands(text: str) -> list[str]:
    """The commands of a markdown text's ```sh blocks, continuation lines joined."""
    out = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line:
                out.append(" ".join(line.split()))
    return out


def runnable(cmd: str) -> bool:
    if "--device cuda" in cmd or "--nnodes" in cmd:
        return torch.cuda.is_available() and "--nnodes" not in cmd
    return cmd.startswith(
        ("fflab ", ".venv/bin/fflab ", "OMP_NUM_THREADS=1 torchrun ", "torchrun ")
    )


SHELL_DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_CASES = [(p.name, shell_commands(p.read_text())) for p in SHELL_DOCS]
SHELL_CASES = [(n, c) for n, c in SHELL_CASES if any(runnable(x) for x in c)]


def to_argv(cmd: str, mnist: str, cwd: Path) -> list[str]:
    """A documented command as an argv for this machine: fflab through this interpreter,
    the documented data folders replaced by the test data, run-name placeholders (``...``)
    by the newest matching run, small settings on every new training run."""
    words = cmd.split()
    while "=" in words[0] and words[0].split("=")[0].isupper():  # VAR=value prefixes
        words = words[1:]
    if words[0] in ("fflab", ".venv/bin/fflab"):
        argv = [sys.executable, "-m", "fflab", *words[1:]]
    else:  # torchrun ... -m fflab ...
        argv = [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    out = []
    for w in argv:
        if w in ("DIR", "../shared/data/mnist"):
            w = mnist
        elif "..." in w:
            hits = sorted(cwd.glob(w.replace("...", "*")), key=lambda p: p.stat().st_mtime)
            assert hits, f"{cmd}: nothing matches {w}"
            w = str(hits[-1])
        out.append(w)
    if "train" in out and "--resume" not in out:
        out += SMALL
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name,commands", SHELL_CASES, ids=[n for n, _ in SHELL_CASES])
def test_docs_shell_commands_run(name, commands, tmp_path, mnist_dir):
    # a user's data folder, as fflab looks it up (FFLAB_DATA) for commands without --data-dir
    mnist = str(Path(mnist_dir).resolve())  # the commands run in tmp_path
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FFLAB_DATA": mnist}
    for cmd in filter(runnable, commands):
        argv = to_argv(cmd, mnist, tmp_path)
        for w in argv:  # a documented output folder under a path of this repository
            if w.endswith(".png") and "/" in w:
                (tmp_path / w).parent.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=env,
                           timeout=600)  # fmt: skip
        # the head holds a crashed rank's own message, the tail the launcher's report
        err = r.stderr if len(r.stderr) < 5000 else r.stderr[:3000] + "\n...\n" + r.stderr[-2000:]
        assert r.returncode == 0, f"{name}: {cmd}\n{err}"
