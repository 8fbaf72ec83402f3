"""Train the small Llama 2 demo model (``weights/demo/``) on the distilled story corpus.

The network is Meta's Llama 2 written out in PyTorch from the formulas of
Meta's ``llama/model.py`` (RMSNorm, interleaved-pair RoPE, grouped-query
attention, SwiGLU with ``ffn_dim_multiplier`` / ``multiple_of``), with Meta's
parameter names, so ``state_dict()`` is already a ``consolidated.00.pth``.

    python scripts/demo/train_demo.py --corpus /tmp/demo_build/train.txt \
        --tokenizer /tmp/demo_build/demo_tok.model --work-dir /tmp/demo_build --out weights/demo

Needs the ``train`` extra (torch). Deterministic for a seed on a given machine
and thread count; checkpoints go to ``--work-dir`` and a rerun resumes from
the last one. After training the model is exported in Meta's layout and read
back through llama2np, whose logits must match torch's.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DemoArgs:
    """The demo's params.json: 4 key/value heads for 8 query heads, FFN widened by 1.3."""

    dim: int = 128
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    vocab_size: int = 1024
    multiple_of: int = 32
    ffn_dim_multiplier: float = 1.3
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 512


# --- the model: Meta's formulas ---------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def precompute_freqs_cis(head_dim: int, end: int, theta: float) -> torch.Tensor:
    """e^(i * pos * theta^(-2k/head_dim)): (end, head_dim // 2) complex."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64)[: head_dim // 2] / head_dim)
    angles = torch.outer(torch.arange(end, dtype=torch.float64), freqs)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of each head as complex numbers. x: (b, s, h, hd)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (b, s, h, hd/2)
    out = torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)
    return out.type_as(x)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(b, s, kv_heads, hd) -> (b, s, kv_heads * n_rep, hd), each kv head repeated n_rep times."""
    b, s, g, hd = x.shape
    return x if n_rep == 1 else x[:, :, :, None, :].expand(b, s, g, n_rep, hd).reshape(b, s, g * n_rep, hd)


class Attention(nn.Module):
    def __init__(self, a: DemoArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.dim // a.n_heads
        self.wq = nn.Linear(a.dim, a.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(a.dim, a.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(a.dim, a.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(a.n_heads * self.head_dim, a.dim, bias=False)

    def forward(self, x, freqs_cis):
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        rep = self.n_heads // self.n_kv_heads
        k, v = repeat_kv(k, rep), repeat_kv(v, rep)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b, heads, s, hd)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # softmax(qk^T/sqrt(hd) + mask) v
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


def ffn_hidden_dim(a: DemoArgs) -> int:
    hidden = int(2 * (4 * a.dim) / 3)
    if a.ffn_dim_multiplier is not None:
        hidden = int(a.ffn_dim_multiplier * hidden)
    return a.multiple_of * ((hidden + a.multiple_of - 1) // a.multiple_of)


class FeedForward(nn.Module):
    def __init__(self, a: DemoArgs):
        super().__init__()
        hidden = ffn_hidden_dim(a)
        self.w1 = nn.Linear(a.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, a.dim, bias=False)
        self.w3 = nn.Linear(a.dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, a: DemoArgs):
        super().__init__()
        self.attention, self.feed_forward = Attention(a), FeedForward(a)
        self.attention_norm, self.ffn_norm = RMSNorm(a.dim, a.norm_eps), RMSNorm(a.dim, a.norm_eps)

    def forward(self, x, freqs_cis):
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, a: DemoArgs):
        super().__init__()
        self.args = a
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(TransformerBlock(a) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps)
        self.output = nn.Linear(a.dim, a.vocab_size, bias=False)
        self.register_buffer("freqs_cis", precompute_freqs_cis(a.dim // a.n_heads, a.max_seq_len, a.rope_theta),
                             persistent=False)
        for name, p in self.named_parameters():  # GPT-2 style init, residual projections scaled down
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * a.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (b, s) -> logits (b, s, vocab), positions from 0."""
        h = self.tok_embeddings(tokens)
        freqs_cis = self.freqs_cis[: tokens.shape[1]]
        for layer in self.layers:
            h = layer(h, freqs_cis)
        return self.output(self.norm(h)).float()


# --- data -------------------------------------------------------------------------------


def encode_corpus(corpus: Path, tokenizer: Path) -> np.ndarray:
    """One story per line -> one stream: BOS story EOS BOS story EOS ... (uint16)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer))
    stories = [line.strip() for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    stream = []
    for ids in sp.encode(stories):
        stream.extend([sp.bos_id(), *ids, sp.eos_id()])
    return np.array(stream, dtype=np.uint16)


def get_batch(data: np.ndarray, batch_size: int, seq_len: int, gen: torch.Generator):
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen).numpy()
    chunk = np.stack([data[s: s + seq_len + 1] for s in starts]).astype(np.int64)
    chunk = torch.from_numpy(chunk)
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def heldout_loss(model: Transformer, data: np.ndarray, seq_len: int, max_windows: int = 16) -> float:
    """Mean next-token loss over the first windows of the held-out stream (float32, no autocast)."""
    n = min(max_windows, (len(data) - 1) // seq_len)
    x = torch.from_numpy(data[: n * seq_len].astype(np.int64)).view(n, seq_len)
    y = torch.from_numpy(data[1: n * seq_len + 1].astype(np.int64)).view(n, seq_len)
    model.eval()
    loss = F.cross_entropy(model(x).view(-1, model.args.vocab_size), y.reshape(-1)).item()
    model.train()
    return loss


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# --- export -----------------------------------------------------------------------------


def export_meta(model: Transformer, tokenizer: Path, out: Path) -> None:
    """params.json + consolidated.00.pth (float32, Meta naming) + tokenizer.model."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(asdict(model.args), indent=2) + "\n")
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, out / "consolidated.00.pth")
    shutil.copyfile(tokenizer, out / "tokenizer.model")


def verify_export(model: Transformer, out: Path, data: np.ndarray) -> float:
    """Read the export back through llama2np; return the largest logit difference to torch."""
    from llama2np import Llama2

    loaded = Llama2.from_pretrained(out)
    tokens = data[:200].astype(np.int64)[None]
    with torch.no_grad():
        want = model(torch.from_numpy(tokens))[0].numpy()
    got = loaded.logits(tokens[0])
    return float(np.abs(got - want).max())


# --- main -------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, required=True, help="training stories, one per line")
    ap.add_argument("--tokenizer", type=Path, required=True, help="the demo's sentencepiece model")
    ap.add_argument("--work-dir", type=Path, required=True, help="checkpoints and the log (outside git)")
    ap.add_argument("--out", type=Path, default=Path("weights/demo"))
    ap.add_argument("--steps", type=int, default=1400)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a busy 2-core machine 2 threads ran 3x slower)")
    ap.add_argument("--heldout", type=Path, help="held-out stories: their loss is printed at every checkpoint")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="autocast matmuls to bfloat16 (about 3x faster on AVX512-BF16 CPUs)")
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--dim", type=int, default=DemoArgs.dim)
    ap.add_argument("--n-layers", type=int, default=DemoArgs.n_layers)
    opt = ap.parse_args()

    torch.set_num_threads(opt.threads)
    torch.manual_seed(opt.seed)
    opt.work_dir.mkdir(parents=True, exist_ok=True)
    data = encode_corpus(opt.corpus, opt.tokenizer)
    heldout = encode_corpus(opt.heldout, opt.tokenizer) if opt.heldout else None
    import sentencepiece

    vocab = sentencepiece.SentencePieceProcessor(model_file=str(opt.tokenizer)).vocab_size()
    args = DemoArgs(dim=opt.dim, n_layers=opt.n_layers, vocab_size=vocab, max_seq_len=opt.seq_len)
    model = Transformer(args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{len(data):,} training tokens; model {asdict(args)}; ffn hidden {ffn_hidden_dim(args)}; "
          f"{n_params:,} parameters", flush=True)

    optim = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(opt.seed)
    ckpt_path, step = opt.work_dir / "demo_ckpt.pt", 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path)
        model.load_state_dict(ckpt["model"])
        optim.load_state_dict(ckpt["optim"])
        gen.set_state(ckpt["gen"])
        step = ckpt["step"]
        print(f"resumed from {ckpt_path} at step {step}", flush=True)

    t0, smooth = time.time(), None
    while step < opt.steps:
        for group in optim.param_groups:
            group["lr"] = lr_at(step, opt.steps, opt.lr, opt.warmup)
        x, y = get_batch(data, opt.batch_size, opt.seq_len, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=opt.bf16):  # bf16 matmuls, fp32 weights
            loss = F.cross_entropy(model(x).view(-1, vocab), y.reshape(-1))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        step += 1
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if step % 25 == 0 or step == opt.steps:
            print(f"step {step}/{opt.steps} loss {loss.item():.4f} (avg {smooth:.4f}) "
                  f"lr {optim.param_groups[0]['lr']:.2e} {time.time() - t0:.0f}s", flush=True)
        if step % opt.save_every == 0 or step == opt.steps:
            if heldout is not None:
                print(f"step {step} held-out loss {heldout_loss(model, heldout, opt.seq_len):.4f}", flush=True)
            torch.save({"model": model.state_dict(), "optim": optim.state_dict(), "gen": gen.get_state(),
                        "step": step}, ckpt_path)

    model.eval()
    export_meta(model, opt.tokenizer, opt.out)
    diff = verify_export(model, opt.out, data)
    print(f"exported to {opt.out}; llama2np vs torch max |logit diff| = {diff:.2e}", flush=True)
    if diff > 1e-3:
        raise SystemExit(f"export check failed: logits differ by {diff:.2e}")


if __name__ == "__main__":
    main()
