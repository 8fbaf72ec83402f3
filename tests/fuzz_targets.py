"""Fuzz targets: every reader of outside bytes, fed mutations of a good input by hypothesis.

Run by ``test_fuzz.py``, each target in its own child process under a memory limit
(``RLIMIT_AS``), so that a count read wrongly fails as MemoryError there instead of
exhausting the machine; each example also has a time limit. The property, for every
target: reading the mutated input either works or raises a ``Llama2npError`` subclass.

    python tests/fuzz_targets.py gguf       # one target, with $HYPOTHESIS_PROFILE (ci or long)
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama2np import Llama2
from llama2np.errors import Llama2npError

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEMO = REPO / "weights" / "demo"
#: seconds one example may take: a small file reads in milliseconds, so this is a hang
EXAMPLE_SECONDS = 20
#: examples per target: the CI profile is deterministic and takes a few seconds a target
PROFILES = {"ci": dict(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "100")), derandomize=True),
            "long": dict(max_examples=3000, derandomize=False)}


def register_profiles() -> None:
    """The ci and long profiles (registering again replaces them: safe to call twice)."""
    common = dict(deadline=None, database=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.filter_too_much])
    for name, values in PROFILES.items():
        settings.register_profile(f"fuzz-{name}", **common, **values)


# --- mutations ---------------------------------------------------------------------------------

HUGE = [2 ** 62, 2 ** 64 - 1, 2 ** 63, 2 ** 32 - 1, 2 ** 31, 10 ** 12]


@st.composite
def mutated(draw, base: bytes, hot: int) -> bytes:
    """``base`` after a few truncations, byte flips, huge counts or inserted bytes, mostly in its first ``hot`` bytes."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        end = len(data) if draw(st.integers(0, 4)) == 0 else min(len(data), hot)
        at = draw(st.integers(0, max(0, end - 1)))
        kind = draw(st.sampled_from(["truncate", "flip", "huge", "huge32", "insert", "zero"]))
        if kind == "truncate":
            del data[at:]
        elif kind == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "huge":
            data[at:at + 8] = struct.pack("<Q", draw(st.sampled_from(HUGE)) % 2 ** 64)
        elif kind == "huge32":
            data[at:at + 4] = struct.pack("<I", draw(st.sampled_from(HUGE)) % 2 ** 32)
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[at:at + 8] = bytes(8)
    return bytes(data)


DEEP = "\u0000deep\u0000"  # stands for an array nested 100,000 deep once serialized
JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.sampled_from(HUGE),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.just(DEEP))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=6)


def paths(doc, prefix=()):
    """Every path into a JSON document (keys and indices), the root first."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from paths(v, prefix + (i,))


def replaced(doc, path, value):
    if not path:
        return value
    doc = dict(doc) if isinstance(doc, dict) else list(doc)
    doc[path[0]] = replaced(doc[path[0]], path[1:], value)
    return doc


def to_text(doc) -> str:
    text = json.dumps(doc, allow_nan=True)
    return text.replace(json.dumps(DEEP), "[" * 100_000 + "]" * 100_000)


@st.composite
def json_mutated(draw, doc) -> str:
    """JSON text of ``doc`` with a value or two replaced (type swaps, huge numbers, NaN, deep nesting),
    a key dropped, or cut short."""
    for _ in range(draw(st.integers(1, 2))):
        spots = list(paths(doc))
        path = draw(st.sampled_from(spots))
        kind = draw(st.sampled_from(["replace", "replace", "drop"]))
        if kind == "drop" and path:
            parent = replaced(doc, (), doc)
            node = parent
            for p in path[:-1]:
                node = node[p]
            if isinstance(node, dict):
                doc = replaced(doc, path[:-1], {k: v for k, v in node.items() if k != path[-1]})
            continue
        doc = replaced(doc, path, draw(JSON_VALUES))
    text = to_text(doc)
    if draw(st.integers(0, 5)) == 0:
        text = text[:draw(st.integers(0, len(text)))]
    return text


# --- the property ------------------------------------------------------------------------------


class _Hang(BaseException):
    """Raised by the alarm: not an Exception, so no library's ``except Exception`` can swallow it."""


def _alarm(signum, frame):
    raise _Hang


EXAMPLES = {"run": 0, "refused": 0}


def only_llama2np_errors(read: Callable[[], object]) -> None:
    """Run ``read``; anything but success or a Llama2npError fails the example (a hang too)."""
    EXAMPLES["run"] += 1
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(EXAMPLE_SECONDS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            read()
    except Llama2npError as e:  # the CLI prints it as one line
        EXAMPLES["refused"] += 1
        assert "\n" not in str(e).strip(), f"a message of several lines: {e}"
    except _Hang:
        raise AssertionError(f"no answer within {EXAMPLE_SECONDS} s") from None
    finally:
        signal.alarm(0)


def use_model(path: Path) -> None:
    """Everything a user would do first with a checkpoint: load it (tokenizer too) and compute logits."""
    model = Llama2.from_pretrained(path)
    model.logits([1, 2, 3], reuse_cache=False)


# --- the inputs --------------------------------------------------------------------------------


def _tiny(dtype: str):
    from llama2np import ModelArgs
    from llama2np.testing.synthetic import random_source

    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, multiple_of=32, vocab_size=1024, max_seq_len=32)
    return args, random_source(args, dtype)


def seed_gguf(work: Path) -> tuple[Path, int]:
    from gguf import GGMLQuantizationType

    from llama2np.testing import gguf_export as ge

    h = ge.HParams(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=1024, context_length=32)
    types, produce = ge.synthetic(h, "Q8_0")
    types["tok_embeddings.weight"] = GGMLQuantizationType.F16
    _, f16 = ge.synthetic(h, "F16")
    path = ge.write_gguf(work / "m.gguf", h, types,
                         lambda n: f16(n) if n == "tok_embeddings.weight" else produce(n),
                         tokenizer_model=DEMO / "tokenizer.model")
    import gguf

    hot = gguf.GGUFReader(path).data_offset  # metadata and tensor infos
    return path, hot


def seed_safetensors(work: Path) -> tuple[Path, int]:
    from llama2np.testing.synthetic import write_hf

    args, source = _tiny("float16")
    write_hf(work / "hf", args, source, "float16")
    path = work / "hf" / "model.safetensors"
    return path, 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def seed_meta(work: Path) -> Path:
    from llama2np.testing.synthetic import write_meta

    args, source = _tiny("bfloat16")
    write_meta(work / "meta", args, source, "bfloat16")
    return work / "meta"


def target_gguf(work: Path):
    path, hot = seed_gguf(work)
    base = path.read_bytes()

    @given(mutated(base, hot))
    def run(data: bytes):
        path.write_bytes(data)
        only_llama2np_errors(lambda: use_model(path))

    return run


def target_safetensors(work: Path):
    path, hot = seed_safetensors(work)
    base = path.read_bytes()
    header = json.loads(base[8:hot])

    @given(st.one_of(mutated(base, hot), json_mutated(header).map(lambda t: t.encode("utf-8", "surrogatepass"))
                     .map(lambda h: struct.pack("<Q", len(h)) + h + base[hot:])))
    def run(data: bytes):
        path.write_bytes(data)
        only_llama2np_errors(lambda: use_model(path.parent))

    return run


def _rezip(src: Path, dst: Path, change: Callable[[str, bytes], bytes]) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, change(info.filename, zin.read(info)))


def target_pth(work: Path):
    directory = seed_meta(work)
    path = directory / "consolidated.00.pth"
    good = work / "good.pth"
    shutil.copyfile(path, good)
    base = good.read_bytes()
    with zipfile.ZipFile(good) as z:
        pickle_name = next(n for n in z.namelist() if n.endswith("data.pkl"))
        pickle_bytes = z.read(pickle_name)

    @given(st.one_of(mutated(base, len(base)), mutated(pickle_bytes, len(pickle_bytes)).map(lambda p: ("pkl", p))))
    def run(data):
        if isinstance(data, tuple):  # a mutated pickle stream in an intact zip
            _rezip(good, path, lambda name, b: data[1] if name == pickle_name else b)
        else:
            path.write_bytes(data)
        only_llama2np_errors(lambda: use_model(directory))

    return run


def target_configs(work: Path):
    from llama2np.distributed.memory_plan import read_model_config
    from llama2np.loaders.int8_writer import quantize_checkpoint
    from llama2np.testing.synthetic import write_hf

    meta = seed_meta(work)
    args, source = _tiny("float32")
    write_hf(work / "hf", args, source, "float32")
    int8 = quantize_checkpoint(meta, work / "int8")
    files = {"params.json": meta / "params.json", "config.json": work / "hf" / "config.json",
             "llama2np.json": int8 / "llama2np.json"}
    docs = {name: json.loads(p.read_text()) for name, p in files.items()}

    @given(st.sampled_from(sorted(files)).flatmap(lambda name: st.tuples(st.just(name), json_mutated(docs[name]))))
    def run(case):
        name, text = case
        path = files[name]
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            only_llama2np_errors(lambda: use_model(path.parent))
            if name != "llama2np.json":
                only_llama2np_errors(lambda: read_model_config(path.parent))
        finally:
            path.write_text(json.dumps(docs[name]))

    return run


def target_npz(work: Path):
    from llama2np.tools.compare import read_logits_npz

    path = work / "other.npz"
    out = io.BytesIO()
    np.savez(out, ids=np.array([1, 5, 7]), logits=np.zeros((3, 16), np.float32))
    base = out.getvalue()

    @given(mutated(base, len(base)))
    def run(data: bytes):
        path.write_bytes(data)
        only_llama2np_errors(lambda: read_logits_npz(path, 16))

    return run


def target_prompts(work: Path):
    from llama2np.tools.logits_file import read_prompts

    model = Llama2.from_pretrained(DEMO)
    path = work / "prompts.jsonl"
    line = st.one_of(JSON_VALUES.map(to_text), st.text(max_size=30),
                     st.lists(st.integers(-2 ** 64, 2 ** 64), max_size=5).map(json.dumps),
                     st.text(max_size=10).map(lambda t: json.dumps({"text": t})),
                     st.binary(max_size=20))

    @given(st.lists(line, min_size=1, max_size=4))
    def run(lines):
        raw = b"\n".join(x if isinstance(x, bytes) else x.encode("utf-8", "surrogatepass") for x in lines)
        path.write_bytes(raw)
        only_llama2np_errors(lambda: read_prompts(path, lambda t: model.tokenizer.encode(t, bos=True),
                                                  model.check_ids))

    return run


TARGETS = {"gguf": target_gguf, "safetensors": target_safetensors, "pth": target_pth, "configs": target_configs,
           "npz": target_npz, "prompts": target_prompts}


def main(name: str) -> int:
    register_profiles()
    settings.load_profile(f"fuzz-{os.environ.get('HYPOTHESIS_PROFILE', 'ci')}")
    with tempfile.TemporaryDirectory(prefix=f"llama2np-fuzz-{name}-") as tmp:
        TARGETS[name](Path(tmp))()
    print(f"{name}: {EXAMPLES['run']} inputs read, {EXAMPLES['refused']} refused with a Llama2npError")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
