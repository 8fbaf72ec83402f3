"""The README says what is true: its Python examples run as written, its flag table is complete."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from llama2np.cli.commands import build_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_python_examples_run_as_written_on_the_demo_model(monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks and "weights/demo" in blocks[0]
    monkeypatch.chdir(REPO)
    namespace: dict = {}
    for block in blocks:  # one session, as a reader would type them
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (len(namespace["ids"]), namespace["model"].args.vocab_size)
    assert namespace["c"].prompt_ids[0] == 1 and namespace["c"].finish_reason in ("eos", "length", "stop")
    assert capsys.readouterr().out  # the streaming loop printed


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
