"""The tensor-parallel memory plan, from a params.json alone (the `plan` command)."""

from __future__ import annotations


def test_cli_plan_70b_from_params_json_alone(tmp_path, capsys):
    from llama2np.cli.commands import main

    (tmp_path / "params.json").write_text('{"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, '
                                          '"n_heads": 64, "n_kv_heads": 8, "n_layers": 80, "norm_eps": 1e-05, '
                                          '"vocab_size": -1}')
    assert main(["plan", "--model", str(tmp_path), "--tensor-parallel", "8"]) == 0
    out = capsys.readouterr().out
    # per layer: wq, wo 8192^2; wk, wv 1024 x 8192; w1, w2, w3 28672 x 8192 -> 855.6M weights, bf16, / 8 actors
    per_actor = 80 * (2 * 8192 ** 2 + 2 * 1024 * 8192 + 3 * 28672 * 8192) * 2 // 8
    assert f"{per_actor / 1024 ** 3:.2f} GiB weights + 320.00 MiB KV cache" in out  # 80 x 4096 x 128 x 4 B x 2
    assert "70B bfloat16  8 " in out and "70B int8      4 " in out
    assert main(["plan", "--model", str(tmp_path), "--tensor-parallel", "3"]) == 2  # 64 heads do not split in 3
    assert "tensor_parallel=3 does not fit this model" in capsys.readouterr().err


