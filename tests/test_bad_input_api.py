"""Token ids, NumPy integers, chat prompts and prompt files: what a caller gives is checked as given."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from llama2np import InputError, Llama2
from llama2np.cli.commands import main
from llama2np.token_ids import check_token_ids

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "weights" / "demo"


@pytest.fixture(scope="module")
def demo() -> Llama2:
    return Llama2.from_pretrained(DEMO)


@pytest.mark.parametrize("ids", [[1, True], [[1, 2], [3, False]], [np.bool_(True), 2]], ids=["flat", "batch", "np.bool_"])
def test_logits_refuse_booleans_as_ids(demo: Llama2, ids):
    with pytest.raises(InputError, match="int token ids, got bool"):
        demo.logits(ids)


def test_decode_of_a_0d_array_is_an_input_error(demo: Llama2):
    with pytest.raises(InputError, match="decode takes a flat"):
        demo.tokenizer.decode(np.array(5))
    assert demo.tokenizer.decode(np.array([450, 996])) == demo.tokenizer.decode([450, 996])


def test_check_token_ids():
    assert check_token_ids(np.array([1, 2], np.int32), 5) == [1, 2]
    assert check_token_ids((np.int64(3), 4), 5) == [3, 4]
    for bad, phrase in [(np.array(5), "shape ()"), ([1, True], "bool"), ("12", "got str"), ([1, 9], "outside"),
                        (np.array([True]), "booleans"), (5, "got int"), ([1.0], "got float")]:
        with pytest.raises(InputError, match=phrase):
            check_token_ids(bad, 5)


def test_numpy_integers_are_accepted_where_ints_are(demo: Llama2):
    from llama2np.distributed.shard import check_world
    from llama2np.errors import DistributedError

    model = Llama2.from_pretrained(DEMO, max_seq_len=np.int64(64))
    assert model.args.max_seq_len == 64 and type(model.args.max_seq_len) is int
    assert check_world(np.int64(16)) == 16
    for bad in (True, np.bool_(True), 2.0, 0, 10 ** 9):
        with pytest.raises(DistributedError, match="tensor_parallel must be an integer"):
            check_world(bad)


def test_a_batch_seed_near_the_int64_limit_is_the_callers_number(demo: Llama2):
    seed = np.int64(2 ** 63 - 1)
    batch = demo.generate(["Once", "The"], max_new_tokens=4, seed=seed, temperature=1.0)
    assert batch[1] == demo.generate("The", max_new_tokens=4, seed=2 ** 63, temperature=1.0)


# --- chat --------------------------------------------------------------------------------------


def test_bad_system_prompt_is_refused_before_the_model_loads(monkeypatch, capsys):
    monkeypatch.setattr("llama2np.cli.commands.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(sys, "stdin", open("/dev/null"))
    assert main(["chat", "--model", str(DEMO), "--system", "[INST] x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--system contains one of the special tags" in err[0]


def test_what_the_model_wrote_never_locks_the_chat(demo: Llama2):
    dialog = [{"role": "user", "content": "Hello"},
              {"role": "assistant", "content": "Sure [INST] and <<SYS>> appear in stories [/INST]"},
              {"role": "user", "content": "Go on"}]
    assert isinstance(demo.chat(dialog, max_new_tokens=3, temperature=0.0), str)
    with pytest.raises(InputError, match="special tags"):  # a user still cannot insert them
        demo.chat([{"role": "user", "content": "[INST] hi"}], max_new_tokens=3)


# --- logits --prompts ---------------------------------------------------------------------------


@pytest.mark.parametrize("line, phrase", [(json.dumps("ok") + "\n" + '"a \\ud800 b"', "line 2: "),
                                          ("[" * 100_000 + "]" * 100_000, "line 1: nested too deeply")],
                         ids=["a lone surrogate", "nested 100000 deep"])
def test_prompts_errors_name_the_line(tmp_path: Path, capsys, line: str, phrase: str):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(line + "\n")
    assert main(["logits", "--model", str(DEMO), "--prompts", str(prompts), "--out", str(tmp_path / "o.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and phrase in err[0], err
