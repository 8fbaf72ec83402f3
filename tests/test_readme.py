"""The README and docs/ say what is true: their Python examples run as written, the flag table is complete.

Every ```python block of README.md and of each docs/*.md file runs, one session per file, from the
repository's directory (so on the demo model); an example that cannot run here (a 70B, a cluster)
is written as a shell block or in the text.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from llama2np.cli.commands import build_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
DOCS = sorted((REPO / "docs").glob("*.md"))


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def run_blocks(blocks: list[str], filename: str) -> dict:
    namespace: dict = {}
    for block in blocks:  # one session, as a reader would type them
        exec(compile(block, filename, "exec"), namespace)
    return namespace


def test_python_examples_run_as_written_on_the_demo_model(monkeypatch, capsys):
    blocks = python_blocks(README)
    assert blocks and "weights/demo" in blocks[0]
    monkeypatch.chdir(REPO)
    namespace = run_blocks(blocks, "README.md")
    assert namespace["logits"].shape == (len(namespace["ids"]), namespace["model"].args.vocab_size)
    assert namespace["c"].prompt_ids[0] == 1 and namespace["c"].finish_reason in ("eos", "length", "stop")
    assert capsys.readouterr().out  # the streaming loop printed


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_python_examples_of_the_docs_run_as_written(doc, monkeypatch, capsys):
    blocks = python_blocks(doc.read_text(encoding="utf-8"))
    if not blocks:
        pytest.skip(f"docs/{doc.name} has no Python example")
    monkeypatch.chdir(REPO)
    run_blocks(blocks, f"docs/{doc.name}")


def test_the_readme_links_only_to_files_that_exist():
    links = re.findall(r"\]\(((?:docs|tests|weights)/[^)#]+|[A-Z-]+\.md)", README)
    assert links and all((REPO / link).exists() for link in links), [l for l in links if not (REPO / l).exists()]


def _flags() -> dict[str, set[str]]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {o for a in p._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
            for name, p in sub.choices.items()}


@pytest.mark.parametrize("command", sorted(_flags()))
def test_every_flag_of_help_is_in_the_readme(command):
    missing = sorted(f for f in _flags()[command] if not re.search(re.escape(f) + r"(?![\w-])", README))
    assert not missing, f"README.md does not mention {command}'s flags {missing}"
    assert f"llama2np {command}" in README


def test_quick_start_makes_a_virtual_environment_before_pip():
    quick = README[README.index("## Quick start"):README.index("## Python API")]
    assert quick.index("python3 -m venv") < quick.index("pip install -e .")
    assert "not a chat model" in quick and "non-editable" in quick


def test_documented_names_are_exported():
    import llama2np
    from llama2np.generation import request as generation

    assert llama2np.ContextLengthWarning is generation.ContextLengthWarning
    assert llama2np.Completion is generation.Completion and "prompt_ids" in README
