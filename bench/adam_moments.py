"""The cost of the fused ``adam`` stream mode (issue 14, item 4) against its peers, on one model's parameters.

    python bench/adam_moments.py                    # gpt2-small's parameter shapes, float32, CPU
    python bench/adam_moments.py --layers 2 --rounds 3
    python bench/adam_moments.py --device cuda

Every peer computes the moments of (θ, m', u) per row and column of each weight (per whole tensor for
vectors) from θ, g, exp_avg and exp_avg_sq, mid-training (step 10):

* ``fused``: ``nmx.adam_moments`` (one read of each tensor, u formed in registers);
* ``kernel``: the same kernel with its arguments checked once, as the tracker's plan calls it (the public
  op validates every list, view and hyperparameter on each call);
* ``eager``: the plain-torch reference, ``theory.update_direction`` then ``nmx.slice_moments``;
* ``foreach``: the same with torch's multi-tensor (``_foreach_*``) ops, as torch's foreach Adam;
* ``compiled``: the eager reference under ``torch.compile``;
* ``floor``: a plain streaming read of the same bytes, ``sum`` of each of the four tensors.

Reported per peer: median time over interleaved rounds (torch.utils.benchmark timers), ns per parameter
element, and "% floor" = floor time / peer time (100%: as fast as reading the bytes once).  The issue's
goal for ``fused`` is >= 70% on CPU.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils import benchmark  # noqa: E402

import neural_mechanics_ext as nmx  # noqa: E402
from neural_mechanics_ext import _backend  # noqa: E402
from neural_mechanics_ext.ops import _adam_args  # noqa: E402
from neural_mechanics_ext.theory.adaptive_forms import AdaptiveHyper, update_direction  # noqa: E402


def gpt2_small_shapes(layers=12, vocab=50257, positions=1024, width=768):
    """The parameter shapes of GPT-2 small (Hugging Face's GPT2LMHeadModel; the head is tied to wte)."""
    shapes = [(vocab, width), (positions, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (width, 3 * width), (3 * width,), (width, width), (width,),
                   (width,), (width,), (width, 4 * width), (4 * width,), (4 * width, width), (width,)]
    return shapes + [(width,), (width,)]


def views_of(shape):
    """Rows and columns of a weight, the whole of a vector."""
    if len(shape) == 1:
        return [(1, 1, shape[0])]
    return [(1, shape[0], shape[1]), (shape[0], shape[1], 1)]


def make_problem(shapes, dtype, device, step):
    gen = torch.Generator().manual_seed(0)
    r = lambda s: torch.randn(s, generator=gen, dtype=torch.float32).to(dtype).to(device)
    params = [r(s) for s in shapes]
    grads = [r(s) for s in shapes]
    states = [{"exp_avg": r(s) * 0.1, "exp_avg_sq": r(s) ** 2 * 0.01, "step": step - 1} for s in shapes]
    return params, grads, states, [views_of(s) for s in shapes]


def peers(params, grads, states, views, hp, compile_reference=True):
    m = [s["exp_avg"] for s in states]
    v = [s["exp_avg_sq"] for s in states]
    kw = dict(step=hp.step, betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay, decoupled_weight_decay=True)

    def fused():
        return nmx.adam_moments(params, views, grads, m, v, **kw)

    # The same kernel with the arguments checked once, as the tracker calls it (its plan is built once;
    # the public op checks every list, view and hyperparameter on each call).
    args = _adam_args(params, views, grads, m, v, None, hp.step, hp.betas, hp.eps, hp.weight_decay, True, False)

    def kernel():
        return _backend.ops.adam_moments(*args)

    def reference():
        pu = [update_direction(t, g, s, hp) for t, g, s in zip(params, grads, states)]
        return nmx.slice_moments(params, views, [p for p, _ in pu], [u for _, u in pu])

    b1, b2 = hp.betas
    bc1, bc2 = hp.bias_corrections

    def foreach():  # the reference with torch's multi-tensor ops, as torch's foreach Adam forms its update
        m1 = torch._foreach_lerp(m, grads, 1 - b1)
        v1 = torch._foreach_mul(v, b2)
        torch._foreach_addcmul_(v1, grads, grads, 1 - b2)
        d = torch._foreach_sqrt(v1)
        torch._foreach_div_(d, bc2 ** 0.5)
        torch._foreach_add_(d, hp.eps)
        u = torch._foreach_div(m1, d)
        torch._foreach_div_(u, bc1)
        return nmx.slice_moments(params, views, m1, u)

    def floor():
        return [t.sum() for ts in (params, grads, m, v) for t in ts]

    out = {"fused": fused, "kernel": kernel, "eager": reference, "foreach": foreach}
    if compile_reference:
        out["compiled"] = torch.compile(reference)
    out["floor"] = floor
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12, help="transformer blocks (default 12: gpt2-small)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the median is reported)")
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds per measurement")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    step = 10
    shapes = gpt2_small_shapes(args.layers)
    params, grads, states, views = make_problem(shapes, torch.float32, device, step)
    numel = sum(p.numel() for p in params)
    hp = AdaptiveHyper("adamw", 1e-3, 0.1, (0.9, 0.999), 1e-8, step)
    fns = peers(params, grads, states, views, hp, not args.no_compile)

    # The peers agree (the float32 arithmetic of fused and eager differs in the last bits only): the
    # largest difference per moment column, relative to that column's largest magnitude.
    want = fns["eager"]()
    for name in ("fused", "kernel", "foreach", "compiled"):
        if name in fns:
            err = ((fns[name]() - want).abs().amax(0) / want.abs().amax(0).clamp_min(1e-300)).max().item()
            print(f"{name}: max difference to eager {err:.1e} (relative to each column's largest value)",
                  file=sys.stderr)

    times = {k: [] for k in fns}
    for r in range(args.rounds):
        names = list(fns)
        for k in names[r % len(names):] + names[:r % len(names)]:  # a different order each round
            t = benchmark.Timer(stmt="f()", globals={"f": fns[k]}, num_threads=torch.get_num_threads())
            times[k].append(t.blocked_autorange(min_run_time=args.min_time).median)
    med = {k: statistics.median(v) for k, v in times.items()}
    nbytes = 4 * sum(p.numel() * p.element_size() for p in params)
    print(f"gpt2-small shapes, {args.layers} layers: {len(params)} tensors, {numel / 1e6:.1f}M elements, float32, "
          f"{nbytes / 1e9:.2f} GB read (θ, g, exp_avg, exp_avg_sq); {device}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'peer':<10}{'ms':>10}{'ns/elem':>10}{'% floor':>10}{'GB/s':>8}")
    for k, t in med.items():
        print(f"{k:<10}{t * 1e3:>10.2f}{t / numel * 1e9:>10.3f}{100 * med['floor'] / t:>9.0f}%{nbytes / t / 1e9:>8.1f}")


if __name__ == "__main__":
    main()
