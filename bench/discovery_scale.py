"""Discovery at the scale of real LLMs (issue 13 item 7): wall time and peak memory of
``find_symmetries(model, batch, twin_layers=3)`` on a Llama-architecture model of ~1.1B parameters
(TinyLlama-1.1B's shape, built from its config with random init: no download).

Each measurement runs in a fresh subprocess, so its peak resident memory (``ru_maxrss`` of the child) is
that of the measured work alone: building the model, then discovery.  Usage::

    python bench/discovery_scale.py [--layers 22] [--dtype bfloat16] [--tokens 16]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def child(args) -> dict:
    import warnings

    import torch
    import transformers

    from neural_mechanics_ext import find_symmetries
    transformers.logging.set_verbosity_error()
    dtype = getattr(torch, args.dtype)
    cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers,
                                   num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                   max_position_embeddings=2048, attn_implementation="sdpa")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(cfg, dtype=dtype).train()
    build_s = time.perf_counter() - t0
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    tokens = torch.randint(0, cfg.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fams, rejected = find_symmetries(model, {"input_ids": tokens, "labels": tokens}, return_rejected=True,
                                         twin_layers=args.twin_layers)
    discover_s = time.perf_counter() - t0
    kinds = {}
    for f in fams:
        kinds[f.kind] = kinds.get(f.kind, 0) + 1
    return {"params": sum(p.numel() for p in model.parameters()), "build_s": build_s, "discover_s": discover_s,
            "rss_after_build_gb": rss_built, "families": len(fams), "kinds": kinds,
            "groups": sum(f.num_groups for f in fams), "rejected": len(rejected),
            "rejected_after_check": sum(r.residual is not None for r in rejected),
            "max_residual": max((f.residual for f in fams), default=None),
            "tolerance": fams[0].tolerance if fams else None,
            "max_twin_residual": max((f.extra.get("twin_residual") or 0 for f in fams), default=None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--twin-layers", type=lambda v: None if v == "none" else int(v), default=3,
                    help="layers of the twin, or 'none' for the proof on a float64 copy of the whole model")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        out = child(args)
        out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB -> GiB
        print("RESULT " + json.dumps(out))
        return
    cmd = [sys.executable, __file__, "--child", "--layers", str(args.layers), "--dtype", args.dtype,
           "--tokens", str(args.tokens), "--twin-layers", str(args.twin_layers).lower()]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"child failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads(line[7:])
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    import torch
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {mem:.1f} GiB RAM, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}")
    print(f"model: Llama {args.layers} layers, hidden 2048, intermediate 5632, 32 heads / 4 kv heads, vocab 32000: "
          f"{res['params'] / 1e9:.2f}B parameters in {args.dtype}; batch 1 x {args.tokens} tokens; "
          f"twin_layers={args.twin_layers}")
    print(f"build (random init): {res['build_s']:.1f} s, peak RSS after build {res['rss_after_build_gb']:.2f} GiB")
    print(f"discovery: {res['discover_s']:.1f} s; peak RSS of the process {child_peak:.2f} GiB "
          f"(model alone {res['rss_after_build_gb']:.2f} GiB); subprocess wall {wall:.1f} s")
    print(f"families: {res['families']} ({res['kinds']}), {res['groups']} groups; rejected {res['rejected']} "
          f"({res['rejected_after_check']} by a gradient check); max residual on the model "
          f"{res['max_residual']:.1e} (tolerance {res['tolerance']:.1e}), max on the float64 twin "
          f"{res['max_twin_residual']:.1e}")


if __name__ == "__main__":
    main()
