"""``plan`` and the tensor-parallel arguments: every count bounded, every bad file or flag one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bounded import run_bounded
from llama2np.cli.commands import main
from llama2np.distributed.memory_plan import memory_plan, read_model_config
from llama2np.model.args import PRESETS

PARAMS = {"dim": 256, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5, "vocab_size": -1}


def plan(tmp_path: Path, capsys, *flags: str, params=PARAMS, name: str = "params.json", text: str | None = None):
    (tmp_path / name).write_text(text if text is not None else json.dumps(params))
    status = main(["plan", "--model", str(tmp_path), *flags])
    out = capsys.readouterr()
    return status, out.out, out.err.strip().splitlines()


def test_a_huge_tensor_parallel_is_refused_at_once(tmp_path: Path):
    huge = dict(PARAMS, dim=2 ** 31, n_heads=2 ** 30)
    (tmp_path / "params.json").write_text(json.dumps(huge))
    outcome = run_bounded("from llama2np.cli.commands import main\n"
                          f"status = main(['plan', '--model', {str(tmp_path)!r}, '--tensor-parallel', '1073741824'])\n"
                          "assert status == 2, status", timeout=60)
    assert outcome.error is None, outcome.message


CASES = {
    "params.json a JSON list": (dict(text="[1, 2]"), "expected a JSON object"),
    "config.json not JSON": (dict(name="config.json", text="{nope"), "not valid JSON"),
    "config.json null": (dict(name="config.json", text="null"), "got a JSON null"),
    "params.json nested deep": (dict(text="[" * 100_000 + "]" * 100_000), "not valid JSON"),
    "--machine-ram nan": (dict(flags=("--machine-ram", "nan")), "--machine-ram must be a positive number"),
    "--machine-ram inf": (dict(flags=("--machine-ram", "inf")), "--machine-ram must be a positive number"),
    "--machine-ram 0": (dict(flags=("--machine-ram", "0")), "--machine-ram must be a positive number"),
    "--machine-ram -5": (dict(flags=("--machine-ram", "-5")), "--machine-ram must be a positive number"),
    "--max-seq-len 0": (dict(flags=("--max-seq-len", "0")), "max_seq_len must be a positive integer"),
    "--tensor-parallel 0": (dict(flags=("--tensor-parallel", "0")), "tensor_parallel must be an integer in [1,"),
    "--tensor-parallel 2**30": (dict(flags=("--tensor-parallel", str(2 ** 30))), "tensor_parallel must be an integer"),
}


@pytest.mark.parametrize("case, phrase", CASES.values(), ids=CASES.keys())
def test_bad_plan_input_is_one_line(tmp_path: Path, capsys, case: dict, phrase: str):
    status, out, err = plan(tmp_path, capsys, *case.get("flags", ()),
                            **{k: v for k, v in case.items() if k != "flags"})
    assert status == 2 and len(err) == 1, err
    assert phrase in err[0]


def test_max_seq_len_is_used_for_meta_params(tmp_path: Path):
    (tmp_path / "params.json").write_text(json.dumps(PARAMS))
    assert read_model_config(tmp_path, 128)[0].max_seq_len == 128


def test_numpy_integers_are_accepted_where_ints_are():
    args = PRESETS["7B"]
    assert memory_plan(args, np.int64(16)).world == 16
    with pytest.raises(Exception, match="tensor_parallel must be an integer"):
        memory_plan(args, True)
