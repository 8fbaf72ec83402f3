"""llama2np in a real Jupyter kernel: load the demo model, generate, stream, show a progress bar (a widget).

The notebook is built here with nbformat and run by nbclient on an ipykernel kernel whose
kernelspec (written to a temporary JUPYTER_PATH) starts this very Python; no network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook test needs the test extra: pip install -e '.[test]'")
nbclient = pytest.importorskip("nbclient", reason="the notebook test needs the test extra: pip install -e '.[test]'")
pytest.importorskip("ipykernel", reason="the notebook test needs the test extra: pip install -e '.[test]'")

from llama2np import Llama2  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "weights" / "demo"
KERNEL = "llama2np-test-python"
PROMPT = "Once upon a time"

CELLS = [
    "from llama2np import Llama2\n"
    "from llama2np.progress import enabled, in_notebook\n"
    "import sys\n"
    "print('KERNEL', sys.executable)\n"
    "print('BARS', in_notebook(), enabled(None))",
    f"model = Llama2.from_pretrained({str(DEMO)!r})\n"
    f"text = model.generate({PROMPT!r}, max_new_tokens=24, temperature=0)\n"
    "print('GENERATED' + text)",
    "pieces = []\n"
    f"for piece in model.generate({PROMPT!r}, max_new_tokens=24, temperature=0, stream=True):\n"
    "    print(piece, end='', flush=True)\n"
    "    pieces.append(piece)\n"
    "print()\n"
    "print('STREAMED', len(pieces), ''.join(pieces) == text)",
    "model.progress = True  # a bar at once, however short the work\n"
    f"print('PERPLEXITY', model.perplexity({PROMPT + ', there was a little cat.'!r}, window=8))",
]


def _texts(cell) -> str:
    """What a cell printed: its stream outputs (stdout and stderr) and results, joined."""
    out = []
    for o in cell.outputs:
        if o.output_type == "stream":
            out.append(o.text)
        elif o.output_type in ("execute_result", "display_data"):
            out.append(str(o.get("data", {}).get("text/plain", "")))
    return "".join(out)


def test_notebook_loads_generates_and_streams(tmp_path, monkeypatch):
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "llama2np test (this Python)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in CELLS]
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": KERNEL, "language": "python"}
    # Raises CellExecutionError (failing the test) if any cell errors in the kernel.
    nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=120, startup_timeout=120,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    outs = [_texts(c) for c in nb.cells]
    assert f"KERNEL {sys.executable}" in outs[0]
    assert "BARS True True" in outs[0]  # a kernel counts as a notebook: bars on by default
    expected = Llama2.from_pretrained(DEMO).generate(PROMPT, max_new_tokens=24, temperature=0)
    assert expected.strip() and "GENERATED" + expected in outs[1]
    assert expected in outs[2] and "STREAMED" in outs[2] and outs[2].rstrip().endswith("True")
    assert "PERPLEXITY" in outs[3] and "perplexity" in outs[3].replace("PERPLEXITY", "")  # the bar's label
    widgets = [o for o in nb.cells[3].outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    if importlib.util.find_spec("ipywidgets") is not None:  # tqdm.auto draws a widget, not text on stderr
        assert widgets and "perplexity" in widgets[0]["data"]["text/plain"]
    else:
        assert not widgets
    assert not any(o.output_type == "error" for c in nb.cells for o in c.outputs)
