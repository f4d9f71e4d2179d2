"""The Python examples of the README and docs/ run as written (in a scratch directory).

A docs/ block is an example when it prints (the others show signatures)."""

import re

import pytest
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
