"""unitrain's Triton kernels against HF eager and Liger-Kernel, plus a ~1B Llama training step.

    python benchmarks/kernel_bench.py                 # CUDA: tables on stdout and benchmarks/results/kernels_<gpu>.md
    python benchmarks/kernel_bench.py --smoke         # CPU: the same code paths at tiny shapes, Triton interpreter

Per kernel at Llama-3-8B shapes (h 4096, i 14336, 32/8 heads of 128, V 128256, 4 × 2048 tokens, bf16; the
fused LoRA linear at q_proj and up_proj shapes, rank 16, against peft's LoRA Linear):
forward, backward and forward+backward time (median of triton.testing.do_bench; backward = full −
forward, because the fused loss computes its gradients in forward) and the peak memory allocated
above the inputs during one forward+backward. Liger-Kernel columns appear when `liger_kernel` imports.
Then a training step (AdamW, bf16 weights) of a Llama-3.2-1B-shaped model from LlamaConfig, random
init: tokens/s and peak memory without kernels, with unitrain's and with Liger's (Liger patches
transformers' Llama module globally, so it runs last); and the same model as LoRA (r 16, every linear
layer, fp32 adapters under bf16 autocast) with and without unitrain's kernels, the fused LoRA linear included.
"""

import argparse
import gc
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Shapes:
    hidden: int = 4096
    intermediate: int = 14336
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    vocab: int = 128256
    batch: int = 4
    seq: int = 2048

    @property
    def tokens(self):
        return self.batch * self.seq


SMOKE = Shapes(hidden=64, intermediate=96, heads=4, kv_heads=2, head_dim=16, vocab=300, batch=2, seq=8)
TRAIN_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
TRAIN_SMOKE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=300, tie_word_embeddings=True,
                   max_position_embeddings=64)


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton interpreter: checks code paths")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="measured training steps (after 3 warm-up steps)")
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--no-liger", action="store_true", help="leave Liger-Kernel out even when installed")
    p.add_argument("--out", default=None, help="folder for kernels_<gpu>.md (default benchmarks/results on CUDA)")
    return p.parse_args()


class Bench:
    """Timing and memory on CUDA; on the smoke path one plain run and no memory numbers."""

    def __init__(self, torch, smoke):
        self.torch, self.smoke = torch, smoke
        self.device = "cpu" if smoke else "cuda"
        self.dtype = torch.float32 if smoke else torch.bfloat16

    def ms(self, fn, grad_to_none=()):
        if self.smoke:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        from triton.testing import do_bench

        try:
            return do_bench(fn, warmup=25, rep=200, grad_to_none=list(grad_to_none), return_mode="median")
        except TypeError:  # a triton without return_mode
            return do_bench(fn, warmup=25, rep=200, grad_to_none=list(grad_to_none))

    def peak_mib(self, fn, tensors=()):
        if self.smoke:
            return None
        torch = self.torch
        for t in tensors:
            t.grad = None
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        for t in tensors:
            t.grad = None
        return peak / 2**20


# ---------------------------------------------------------------- kernel cases

def kernel_cases(torch, b: Bench, s: Shapes, liger):
    """Yield (kernel, inputs that get gradients, {impl: forward fn}, upstream-gradient maker)."""
    import torch.nn.functional as F
    from transformers.activations import ACT2FN
    from transformers.loss.loss_utils import ForCausalLMLoss
    from transformers.models.llama import modeling_llama as hf

    import unitrain_kernels as uk

    dev, dt, T = b.device, b.dtype, s.tokens
    hf_rope = hf.apply_rotary_pos_emb  # the module's own function (nothing is patched here)

    def param(*shape, scale=1.0):
        return torch.nn.Parameter(scale * torch.randn(*shape, device=dev, dtype=dt))

    # RMSNorm: HF's LlamaRMSNorm.forward on the same weight
    x = torch.randn(T, s.hidden, device=dev, dtype=dt, requires_grad=True)
    w = torch.nn.Parameter(1 + 0.1 * torch.randn(s.hidden, device=dev, dtype=dt))
    hf_norm = hf.LlamaRMSNorm(s.hidden, eps=1e-5).to(dev, dt)
    hf_norm.weight = w
    impls = {"eager": lambda x, w: hf_norm(x), "unitrain": lambda x, w: uk.RMSNormFunction.apply(x, w, 1e-5)}
    if liger:
        ln = liger["LigerRMSNorm"](s.hidden, eps=1e-5).to(dev, dt)
        ln.weight = w
        impls["liger"] = lambda x, w: ln(x)
    yield "rmsnorm", [x, w], impls

    # RoPE on q/k as HF's attention hands them over: transposed views of the projections
    qp = torch.randn(s.batch, s.seq, s.heads * s.head_dim, device=dev, dtype=dt, requires_grad=True)
    kp = torch.randn(s.batch, s.seq, s.kv_heads * s.head_dim, device=dev, dtype=dt, requires_grad=True)
    rot = hf.LlamaRotaryEmbedding(hf.LlamaConfig(hidden_size=s.heads * s.head_dim, num_attention_heads=s.heads,
                                                 head_dim=s.head_dim, max_position_embeddings=s.seq)).to(dev)
    cos, sin = rot(qp, torch.arange(s.seq, device=dev)[None].expand(s.batch, -1))

    def heads(fn):
        def run(qp, kp):
            q = qp.view(s.batch, s.seq, s.heads, s.head_dim).transpose(1, 2)
            k = kp.view(s.batch, s.seq, s.kv_heads, s.head_dim).transpose(1, 2)
            return fn(q, k, cos, sin)
        return run

    impls = {"eager": heads(hf_rope), "unitrain": heads(uk.apply_rope)}
    if liger:
        impls["liger"] = heads(liger["liger_rotary_pos_emb"])
    yield "rope", [qp, kp], impls

    # SwiGLU: act_fn(gate) * up as in HF's LlamaMLP
    a = torch.randn(T, s.intermediate, device=dev, dtype=dt, requires_grad=True)
    u = torch.randn(T, s.intermediate, device=dev, dtype=dt, requires_grad=True)
    silu = ACT2FN["silu"]
    impls = {"eager": lambda a, u: silu(a) * u, "unitrain": uk.SwiGLUFunction.apply}
    if liger:
        impls["liger"] = liger["LigerSiLUMulFunction"].apply
    yield "swiglu", [a, u], impls

    # linear + cross-entropy: HF's lm_head then ForCausalLMLoss (already-shifted labels)
    h = torch.randn(T, s.hidden, device=dev, dtype=dt, requires_grad=True)
    target = torch.randint(0, s.vocab, (T,), device=dev)
    target[:: 8] = -100
    for frozen in (False, True):
        W = param(s.vocab, s.hidden, scale=0.02)
        W.requires_grad_(not frozen)

        def eager(h, W=W):
            return ForCausalLMLoss(F.linear(h, W), None, s.vocab, shift_labels=target)

        impls = {"eager": eager,
                 "unitrain": lambda h, W=W: uk.fused_linear_cross_entropy(h, W, target)}
        if not frozen:
            impls["unitrain (bf16 grad-W sum)"] = (
                lambda h, W=W: uk.fused_linear_cross_entropy(h, W, target, grad_weight_fp32=False))
        if liger:
            flce = liger["LigerFusedLinearCrossEntropyLoss"]()
            impls["liger"] = lambda h, W=W, flce=flce: flce(W, h, target)
        yield ("fused_ce (frozen lm_head)" if frozen else "fused_ce"), ([h] if frozen else [h, W]), impls


    # LoRA linear (r 16, α 32): peft's LoRA Linear over a frozen 16-bit base (base GEMM, two adapter GEMMs, an
    # add) against the fused kernel; fp32 adapters under autocast, as the trainer runs them. Liger has none.
    from peft import LoraConfig, inject_adapter_in_model

    for name, d_in, d_out in (("lora (q_proj)", s.hidden, s.heads * s.head_dim), ("lora (up_proj)", s.hidden,
                                                                                   s.intermediate)):
        base = torch.nn.Linear(d_in, d_out, bias=False, device=dev, dtype=dt).requires_grad_(False)
        holder = inject_adapter_in_model(LoraConfig(r=16, lora_alpha=32, target_modules=["proj"]),
                                         torch.nn.ModuleDict({"proj": base}))
        layer = holder["proj"].to(dev)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            B.normal_(0, 0.02)
        xl = torch.randn(T, d_in, device=dev, dtype=dt, requires_grad=True)

        def in_autocast(fn):
            def run(*args):
                with torch.autocast(dev, dtype=dt, enabled=not b.smoke):
                    return fn(*args)
            return run

        impls = {"eager": in_autocast(lambda x, A, B, layer=layer: layer(x)),
                 "unitrain": in_autocast(lambda x, A, B, base=base: uk.lora_linear(x, base.weight, A, B, 2.0))}
        yield name, [xl, A, B], impls


def run_kernels(torch, b: Bench, s: Shapes, liger):
    rows = []
    for kernel, inputs, impls in kernel_cases(torch, b, s, liger):
        for impl, fn in impls.items():
            try:
                rows.append(measure_case(torch, b, kernel, impl, fn, inputs))
            except Exception as e:  # one implementation failing must not hide the others
                rows.append(dict(kernel=kernel, impl=impl, error=f"{type(e).__name__}: {e}"[:200]))
            print(format_row(rows[-1]), flush=True)
        del inputs, impls
        gc.collect()
        if not b.smoke:
            torch.cuda.empty_cache()
    return rows


def measure_case(torch, b, kernel, impl, fn, inputs):
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    grads = [None if o.dim() == 0 else torch.randn_like(o) for o in outs]
    del out, outs

    def forward():
        return fn(*inputs)

    def full():
        res = fn(*inputs)
        res = res if isinstance(res, tuple) else (res,)
        torch.autograd.backward(res, [g for g in grads] if grads[0] is not None else None)

    f_ms = b.ms(forward)
    full_ms = b.ms(full, grad_to_none=inputs)
    return dict(kernel=kernel, impl=impl, fwd=f_ms, bwd=full_ms - f_ms, full=full_ms,
                mib=b.peak_mib(full, inputs))


def format_row(r):
    if "error" in r:
        return f"{r['kernel']:<26} {r['impl']:<28} error: {r['error']}"
    mib = "-" if r["mib"] is None else f"{r['mib']:.0f} MiB"
    return f"{r['kernel']:<26} {r['impl']:<28} fwd {r['fwd']:.3f} ms  bwd {r['bwd']:.3f} ms  " \
           f"full {r['full']:.3f} ms  peak {mib}"


def kernel_table(rows):
    lines = ["| kernel | implementation | fwd ms | bwd ms | fwd+bwd ms | peak MiB | speed-up vs eager | "
             "memory ÷ eager | time ÷ liger |", "|---|---|---|---|---|---|---|---|---|"]
    by = {(r["kernel"], r["impl"]): r for r in rows}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['impl']} | error: {r['error']} | | | | | | |")
            continue
        eager, lig = by.get((r["kernel"], "eager")), by.get((r["kernel"], "liger"))
        ok = lambda o: o is not None and "error" not in o  # noqa: E731
        speed = f"{eager['full'] / r['full']:.2f}×" if ok(eager) else "-"
        mem = (f"{r['mib'] / eager['mib']:.2f}" if ok(eager) and r["mib"] and eager["mib"] else "-")
        vs_liger = f"{r['full'] / lig['full']:.2f}" if ok(lig) else "-"
        mib = "-" if r["mib"] is None else f"{r['mib']:.0f}"
        lines.append(f"| {r['kernel']} | {r['impl']} | {r['fwd']:.3f} | {r['bwd']:.3f} | {r['full']:.3f} | {mib} | "
                     f"{speed} | {mem} | {vs_liger} |")
    return lines


# ---------------------------------------------------------------- training step

def train_variant(torch, b: Bench, config_kw, variant, batch, seq, steps, liger):
    from transformers import LlamaConfig, LlamaForCausalLM

    import unitrain_kernels as uk

    torch.manual_seed(0)
    config = LlamaConfig(**config_kw, attn_implementation="sdpa")
    with torch.device(b.device):
        model = LlamaForCausalLM(config).to(b.dtype)
    detail = ""
    if variant.endswith("+ LoRA"):  # r 16 on every linear layer, frozen 16-bit base, fp32 adapters under autocast
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if variant.startswith("unitrain"):
        report = uk.patch_model(model, mode="on")
        detail = ", ".join(k for k in uk.KERNEL_NAMES if report.is_active(k))
    elif variant == "liger":
        liger["apply_liger_kernel_to_llama"](model=model)
        detail = "rope, rms_norm, swiglu, fused_linear_cross_entropy"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                            **({} if b.smoke else {"fused": True}))
    autocast = torch.autocast(b.device, dtype=b.dtype, enabled=not b.smoke and variant.endswith("+ LoRA"))
    g = torch.Generator(device=b.device).manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=b.device, generator=g)

    def step():
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    first = step().item()
    for _ in range(2):
        step()
    sync = (lambda: None) if b.smoke else torch.cuda.synchronize
    if not b.smoke:
        torch.cuda.reset_peak_memory_stats()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t) / steps
    peak = None if b.smoke else torch.cuda.max_memory_allocated() / 2**30
    if variant.startswith("unitrain"):
        uk.unpatch_model(model)
    return dict(variant=variant, detail=detail, step_ms=dt * 1e3, tok_s=batch * seq / dt, gib=peak, first_loss=first)


def run_training(torch, b, args, liger):
    config_kw = TRAIN_SMOKE if b.smoke else TRAIN_1B
    batch, seq = (2, 8) if b.smoke else (args.train_batch, args.seq)
    steps = 1 if b.smoke else args.steps
    rows = []
    # Liger patches transformers' Llama module for good: it runs last
    for variant in ["eager", "unitrain", "eager + LoRA", "unitrain + LoRA"] + (["liger"] if liger else []):
        try:
            rows.append(train_variant(torch, b, config_kw, variant, batch, seq, steps, liger))
        except Exception as e:
            rows.append(dict(variant=variant, error=f"{type(e).__name__}: {e}"[:300]))
        gc.collect()  # the variant's model and optimizer went with its frame
        if not b.smoke:
            torch.cuda.empty_cache()
        print(rows[-1], flush=True)
    return rows, batch, seq


def train_table(rows):
    lines = ["| variant | kernels | step ms | tokens/s | × eager tokens/s | peak GiB | first-step loss |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | error: {r['error']} | | | | | |")
            continue
        base = "eager + LoRA" if r["variant"].endswith("+ LoRA") else "eager"  # LoRA rows against eager LoRA
        eager = next((e for e in rows if e["variant"] == base and "error" not in e), None)
        ratio = f"{r['tok_s'] / eager['tok_s']:.3f}×" if eager else "-"
        gib = "-" if r["gib"] is None else f"{r['gib']:.2f}"
        lines.append(f"| {r['variant']} | {r['detail'] or '-'} | {r['step_ms']:.1f} | {r['tok_s']:.0f} | {ratio} | "
                     f"{gib} | {r['first_loss']:.4f} |")
    return lines


def targets(krows, trows):
    """The issue's GPU targets, each marked met / missed from this run's numbers."""
    by = {(r["kernel"], r["impl"]): r for r in krows if "error" not in r}
    out = []

    def line(name, ok, detail):
        out.append(f"- {'met' if ok else 'MISSED'}: {name} ({detail})")

    e, u = by.get(("rmsnorm", "eager")), by.get(("rmsnorm", "unitrain"))
    if e and u:
        line("RMSNorm ≥ 3× eager fwd+bwd", e["full"] / u["full"] >= 3, f"{e['full'] / u['full']:.2f}×")
    e, u = by.get(("fused_ce", "eager")), by.get(("fused_ce", "unitrain"))
    if e and u and e["mib"] and u["mib"]:
        line("fused linear CE ≥ 4× less peak memory", e["mib"] / u["mib"] >= 4, f"{e['mib'] / u['mib']:.2f}×")
        line("fused linear CE ≤ 15% more time", u["full"] <= 1.15 * e["full"], f"{u['full'] / e['full']:.2f}× eager")
    t = {r["variant"]: r for r in trows if "error" not in r}
    if "eager" in t and "unitrain" in t:
        r = t["unitrain"]["tok_s"] / t["eager"]["tok_s"]
        line("training step ≥ 1.15× eager throughput", r >= 1.15, f"{r:.3f}×")
    if "liger" in t and "unitrain" in t:
        r = t["unitrain"]["tok_s"] / t["liger"]["tok_s"]
        line("training step no slower than Liger", r >= 1.0, f"{r:.3f}× Liger")
    return out


def load_liger(disabled):
    if disabled:
        return None
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except Exception as e:  # absent or incompatible: the Liger columns are left out
        print(f"liger-kernel not used: {type(e).__name__}: {e}")
        return None
    return dict(LigerSiLUMulFunction=LigerSiLUMulFunction, apply_liger_kernel_to_llama=apply_liger_kernel_to_llama,
                LigerFusedLinearCrossEntropyLoss=LigerFusedLinearCrossEntropyLoss, LigerRMSNorm=LigerRMSNorm,
                liger_rotary_pos_emb=liger_rotary_pos_emb)


def main():
    args = parse()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the interpreter needs it then
    import torch

    if not args.smoke and not torch.cuda.is_available():
        sys.exit("benchmarks/kernel_bench.py needs a CUDA GPU and found none. "
                 "Run `python benchmarks/kernel_bench.py --smoke` to check its code paths on CPU.")
    import transformers
    import triton

    liger = load_liger(args.no_liger)
    b = Bench(torch, args.smoke)
    shapes = SMOKE if args.smoke else Shapes(batch=args.batch, seq=args.seq)
    gpu = "cpu-smoke" if args.smoke else torch.cuda.get_device_name()
    versions = (f"torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}, "
                f"liger-kernel {_version('liger-kernel') if liger else 'not used'}")
    print(f"# {gpu}: {versions}", flush=True)

    krows = run_kernels(torch, b, shapes, liger)
    trows, tb, ts = run_training(torch, b, args, liger) if not args.skip_train else ([], 0, 0)

    md = [f"# unitrain kernels on {gpu}", "",
          f"`python benchmarks/kernel_bench.py{' --smoke' if args.smoke else ''}` — {versions}.", "",
          f"## Kernels at {'tiny smoke' if args.smoke else 'Llama-3-8B'} shapes ({shapes.batch} × {shapes.seq} "
          f"tokens, h {shapes.hidden}, i {shapes.intermediate}, {shapes.heads}/{shapes.kv_heads} heads × {shapes.head_dim}, V {shapes.vocab}, "
          f"{str(b.dtype).replace('torch.', '')})", "",
          "Median of `triton.testing.do_bench`; bwd = (fwd+bwd) − fwd; peak = most memory allocated above the "
          "inputs during one fwd+bwd (includes the input gradients). speed-up = eager time ÷ this time; "
          "memory ÷ eager and time ÷ liger: this one over the other (below 1 is better).", ""]
    md += kernel_table(krows)
    if trows:
        md += ["", f"## Training step: {'tiny' if args.smoke else 'Llama-3.2-1B'} shape from LlamaConfig, random init, "
                   f"{str(b.dtype).replace('torch.', '')} weights, AdamW, {tb} × {ts} tokens, SDPA", ""]
        md += train_table(trows)
    md += ["", "## Targets (issue 7)" + (" — smoke run: interpreter timings, not meaningful" if args.smoke else ""),
           ""] + (targets(krows, trows) or ["- (no numbers)"])
    text = "\n".join(md) + "\n"
    print("\n" + text)
    out = args.out or (None if args.smoke else str(Path(__file__).parent / "results"))
    if out:
        name = "".join(c if c.isalnum() else "_" for c in gpu.lower()).strip("_")
        path = Path(out) / f"kernels_{name}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")


def _version(dist):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    main()
