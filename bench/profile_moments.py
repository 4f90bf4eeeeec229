"""Where slice_moments spends its time: per-tensor breakdown against the memory floor, and the compute
cost per element of each kernel path with the data in cache.

    python bench/profile_moments.py --set vgg16_bn --threads 1
    python bench/profile_moments.py --paths-only
    python bench/profile_moments.py --device cuda      # GB/s per kernel path, 200 MB per case (HBM)

Per tensor: our time, the streaming read of the same bytes (three torch.sum) and their ratio, so the
tensors (and kernel paths) that miss the floor stand out.  Per path: nanoseconds per element for a
tensor that fits in L2, i.e. the arithmetic cost with memory out of the way; compare it with the
floor's ns per element (12 bytes / read bandwidth) to see whether a path can hide under the memory
traffic at all.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import neural_mechanics_ext as nmx  # noqa: E402
from neural_mechanics_ext import bench as B  # noqa: E402
from neural_mechanics_ext.app.timing import spread  # noqa: E402


def measure(peers, device, rounds, min_time):
    """The suite's interleaved rounds (``neural_mechanics_ext.bench.measure``), except on one CPU thread:
    there the timers read the calling thread's CPU time, which other processes' time slices do not
    inflate (a shared machine's main source of noise)."""
    one_thread = device.type == "cpu" and torch.get_num_threads() == 1
    return B.measure(peers, rounds, min_time=min_time, baseline=next(iter(peers)),
                     timer=time.thread_time if one_thread else None)


def per_tensor(pset, rounds, min_time):
    cpu = torch.device("cpu")
    inp = B.materialize(pset, cpu)
    rows = []
    total = {"ours": 0.0, "stream": 0.0}
    for i, ((name, shape), views) in enumerate(zip(pset.shapes, pset.views)):
        x, g, v = inp.xs[i], inp.gs[i], inp.vs[i]
        if x.numel() < 100_000:
            continue
        peers = {"ours": lambda: nmx.slice_moments([x], [views], [g], [v]),
                 "stream": lambda: (x.sum(), g.sum(), v.sum())}
        m = measure(peers, cpu, rounds, min_time)
        t = {k: spread(m.seconds[k])["median"] for k in peers}
        r = B.paired_ratios(m.seconds["ours"], m.seconds["stream"])["median"]
        nbytes = 12 * x.numel()
        rows.append((name, shape, views, t["ours"], t["stream"], r, nbytes))
        for k in total:
            total[k] += t[k]
    print(f"{'tensor':28s} {'shape':>16s} {'views':36s} {'ours ms':>8s} {'GB/s':>6s} {'read ms':>8s} {'GB/s':>6s} "
          f"{'ours/read':>9s}")
    for name, shape, views, to, ts, r, nb in sorted(rows, key=lambda r: -r[3])[:25]:
        print(f"{name:28s} {str(tuple(shape)):>16s} {str(views):36s} {to * 1e3:8.2f} {nb / to / 1e9:6.1f} "
              f"{ts * 1e3:8.2f} {nb / ts / 1e9:6.1f} {r:9.2f}")
    print(f"sum over tensors >= 100k elements: ours {total['ours'] * 1e3:.1f} ms, read {total['stream'] * 1e3:.1f} ms "
          f"({total['stream'] / total['ours'] * 100:.0f}% of floor)")


def paths(rounds, min_time, device=torch.device("cpu"), copy_gbps=None):
    if device.type == "cuda":
        R, L = 4096, 4096                 # 16 M elements: 200 MB for x, g, v fp32, far beyond L2
    else:
        R, L = 128, 1024                  # 128k elements: 1.5 MB for x, g, v fp32 (L2/L3-resident)
    n = R * L
    gen = torch.Generator(device=device).manual_seed(0)
    x, g, v = (torch.randn(R, L, generator=gen, device=device) for _ in range(3))
    gb = g.to(torch.bfloat16)
    cases = {
        "rows (1,R,L)        x":      ([(1, R, L)], None, None),
        "rows (1,R,L)        x,g,v":  ([(1, R, L)], [g], [v]),
        "rows (1,R,L)        x,g16,v": ([(1, R, L)], [gb], [v]),
        "cols (R,L,1)        x,g,v":  ([(R, L, 1)], [g], [v]),
        "rows+cols           x,g,v":  ([(1, R, L), (R, L, 1)], [g], [v]),
        "in-channels (R,L/8,8)+rows x,g,v": ([(1, R, L), (R, L // 8, 8)], [g], [v]),
        "whole (1,1,N)       x,g,v":  ([(1, 1, n)], [g], [v]),
    }
    peers = {k: (lambda vs=vs, ys=ys, zs=zs: nmx.slice_moments([x], [vs], ys, zs)) for k, (vs, ys, zs) in cases.items()}
    # The fixed cost of a call (argument checks, plan lookup, dispatch), measured on an 8 x 8 tensor and
    # subtracted, so that the per-element figures are the kernel's.
    tiny = [torch.randn(8, 8, device=device) for _ in range(3)]
    peers["fixed cost of a call (8x8)"] = lambda: nmx.slice_moments([tiny[0]], [[(1, 8, 8), (8, 8, 1)]], [tiny[1]],
                                                                     [tiny[2]])
    peers["3 x torch.sum (fp32)"] = lambda: (x.sum(), g.sum(), v.sum())
    m = measure(peers, device, rounds, min_time)
    where = "in HBM" if device.type == "cuda" else f"in cache, {torch.get_num_threads()} thread(s)" + (
        ", CPU time of the thread" if torch.get_num_threads() == 1 else ", wall time")
    print(f"cost per element by kernel path ({R}x{L} fp32 tensors, {where}):")
    fixed = spread(m.seconds["fixed cost of a call (8x8)"])["median"]
    print(f"  fixed cost of a call: {fixed * 1e6:.1f} us (subtracted below)")
    for k, (vs, ys, zs) in list(cases.items()) + [("3 x torch.sum (fp32)", (None, [g], [v]))]:
        q = {key: val - (fixed if k in cases and key in ("median", "q1", "q3") else 0.0)
             for key, val in spread(m.seconds[k]).items()}
        nbytes = n * (4 + sum(t[0].element_size() for t in (ys, zs) if t))
        gbps = nbytes / q["median"] / 1e9
        share = f", {gbps / copy_gbps * 100:.0f}% of copy" if copy_gbps else ""
        print(f"  {k:36s} {q['median'] / n * 1e9:6.3f} ns/elem  (IQR {q['q1'] / n * 1e9:.3f}-{q['q3'] / n * 1e9:.3f})"
              f"  {gbps:7.1f} GB/s{share}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="vgg16_bn", choices=sorted(B.SET_BUILDERS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.05)
    ap.add_argument("--paths-only", action="store_true")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    print(f"package {nmx.__file__}; {nmx.build_info()}; threads {torch.get_num_threads()}; load {os.getloadavg()}")
    bw = B.bandwidth(device, (2 << 30) if device.type == "cuda" else (256 << 20), rounds=5)
    print(f"read {bw['read_gbps']:.1f} GB/s -> floor {12 / bw['read_gbps']:.3f} ns per element of x,g,v fp32; "
          f"copy {bw['copy_gbps']:.1f} GB/s")
    paths(args.rounds, args.min_time, device, bw["copy_gbps"] if device.type == "cuda" else None)
    if not args.paths_only and device.type == "cpu":
        per_tensor(B.SET_BUILDERS[args.set](), args.rounds, args.min_time)


if __name__ == "__main__":
    main()
