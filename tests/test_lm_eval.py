"""lm-evaluation-harness on a small local task: the ``llama2np`` model, and ``local-completions`` at the server.

The task (a task YAML and a few JSONL items) is written into the test's temporary
directory; nothing is downloaded. Both models must give the engine's own
log-likelihoods: log-softmax of ``Llama2.logits`` over context + continuation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read when datasets is imported: never look online
pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # local-completions needs it

import lm_eval  # noqa: E402
from conftest import SERVER_KEY  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import llama2np.lm_eval  # noqa: E402,F401  (registers the model "llama2np")
from llama2np import Llama2  # noqa: E402
from llama2np.generation.sampling import log_softmax  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "weights" / "demo"
ITEMS = [
    {"question": "Once upon a time, there was a little", "choices": ["girl", "dog", "car"], "answer": 0},
    {"question": "Lily went to the park to play with her", "choices": ["friends", "homework", "lamp"], "answer": 0},
    {"question": "The sun was", "choices": ["shining brightly in the sky", "sad", "blue"], "answer": 0},
    {"question": "Tom had a big red", "choices": ["ball", "idea"], "answer": 0},
]


@pytest.fixture(scope="module")
def reference() -> Llama2:
    return Llama2.from_pretrained(DEMO, dtype="float64")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> TaskManager:
    where = tmp_path_factory.mktemp("task")
    (where / "stories.jsonl").write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    (where / "stories.yaml").write_text(f"""task: stories_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {where / "stories.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return TaskManager(include_path=str(where), include_defaults=False)  # not lm-eval's thousands of tasks


def _scores(results) -> list[tuple[float, bool]]:
    """(log-likelihood, is-greedy) of every choice of every item, in order."""
    return [tuple(r[0]) for s in results["samples"]["stories_choice"] for r in s["resps"]]


def _engine_scores(model: Llama2, bos: bool) -> list[tuple[float, bool]]:
    out = []
    for item in ITEMS:
        context = model.tokenizer.encode(item["question"], bos=bos)
        for choice in item["choices"]:
            whole = model.tokenizer.encode(item["question"] + " " + choice, bos=bos)
            lp = log_softmax(model.logits(whole, reuse_cache=False))
            pos = np.arange(len(context) - 1, len(whole) - 1)
            target = np.asarray(whole[len(context):])
            out.append((float(lp[pos, target].sum()), bool((lp[pos].argmax(-1) == target).all())))
    return out


def test_llama2np_and_local_completions_give_the_engines_loglikelihoods(tasks, reference, served_demo, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SERVER_KEY)  # what local-completions sends as its bearer token
    # local-completions tokenizes through the server's /tokenize, without BOS: compare like with like
    direct = lm_eval.simple_evaluate(model="llama2np", model_args=f"pretrained={DEMO},dtype=float64,add_bos_token=False",
                                     tasks=["stories_choice"], task_manager=tasks, log_samples=True, bootstrap_iters=0)
    served = lm_eval.simple_evaluate(
        model="local-completions", tasks=["stories_choice"], task_manager=tasks, log_samples=True, bootstrap_iters=0,
        model_args=f"model=demo,base_url={served_demo}/v1/completions,tokenizer_backend=remote,"
                   f"auth_token={SERVER_KEY},max_length=512")
    engine = _engine_scores(reference, bos=False)
    for got in (_scores(direct), _scores(served)):
        np.testing.assert_allclose([s for s, _ in got], [s for s, _ in engine], rtol=0, atol=1e-9)
        assert [g for _, g in got] == [g for _, g in engine]
    assert any(g for _, g in engine) and not all(g for _, g in engine)  # is-greedy is tested both ways
    assert direct["results"]["stories_choice"]["acc,none"] == served["results"]["stories_choice"]["acc,none"]


def test_with_bos_by_default_and_batched_like_one_at_a_time(reference):
    lm = llama2np.lm_eval.Llama2npLM(model=reference, batch_size=2)
    requests = [Instance("loglikelihood", {}, (item["question"], " " + c), i)
                for i, item in enumerate(ITEMS) for c in item["choices"]]
    np.testing.assert_allclose([s for s, _ in lm.loglikelihood(requests)],
                               [s for s, _ in _engine_scores(reference, bos=True)], rtol=0, atol=1e-9)


def test_loglikelihood_rolling_is_the_texts_log_probability(reference):
    lm = llama2np.lm_eval.Llama2npLM(model=reference)
    text = "Once upon a time, there was a little girl named Lily. She liked to play in the park."
    ids = [reference.tokenizer.bos_id] + reference.tokenizer.encode(text, bos=False)
    lp = log_softmax(reference.logits(ids, reuse_cache=False))
    want = float(lp[np.arange(len(ids) - 1), ids[1:]].sum())
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert got == pytest.approx([want], abs=1e-9)


def test_generate_until_is_greedy_generation_cut_at_until(reference):
    lm = llama2np.lm_eval.Llama2npLM(model=reference)
    prompts = ["Once upon a time", "The dog"]
    requests = [Instance("generate_until", {}, (p, {"until": ["."], "max_gen_toks": 40}), i)
                for i, p in enumerate(prompts)]
    want = [reference.generate(p, max_new_tokens=40, temperature=0, stop=["."]) for p in prompts]
    assert lm.generate_until(requests) == want
