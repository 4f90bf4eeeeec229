"""``neural-mechanics check``: the Hessian constraints of a preset model's symmetries, with a verdict and
the cost of the check in training steps."""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from .. import find_symmetries, hessian_check
from .models import MODELS, build_model
from .timing import time_training_step


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``neural-mechanics check``."""
    parser.add_argument("--model", default="mlp", choices=list(MODELS),
                        help="model preset of neural_mechanics_ext.app.models (default: mlp)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    parser.add_argument("--image-size", type=int, default=32, help="input height and width (default 32)")
    parser.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    parser.add_argument("--bn-eps", type=float, help="BatchNorm eps of the preset (default: the preset's, 1e-5)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--family", nargs="+", metavar="NAME",
                        help="check only the families whose name contains one of these strings")
    parser.add_argument("--eval", action="store_true", help="check the model in eval mode")
    parser.add_argument("--tolerance", type=float, help="one tolerance for every family")
    parser.add_argument("--no-projections", action="store_true", help="skip the H g product and the projections")
    parser.add_argument("--repeats", type=int, default=3, help="training steps timed for the cost ratio")
    parser.add_argument("--seed", type=int, default=0)


def check_main(args: argparse.Namespace) -> int:
    """``neural-mechanics check``: find the symmetries of a preset, check their Hessian constraints on
    a random batch, print the table and the cost of the check relative to one training step.  Exit
    status 1 when a family fails."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("neural-mechanics check: --device cuda but no CUDA device is available")
        return 2
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    model = build_model(args.model, args.classes, image_size=args.image_size, bn_eps=args.bn_eps)
    model = model.to(device=device, dtype=dtype)
    if args.eval:
        model.eval()
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen, dtype=dtype).to(device)
    y = torch.randint(args.classes, (args.batch,), generator=gen).to(device)
    t = time.perf_counter()
    families = find_symmetries(model, x, loss="cross_entropy", seed=args.seed)
    found = time.perf_counter() - t
    if args.family:
        families = [f for f in families if any(s in f.name for s in args.family)]
    print(f"{args.model} ({sum(p.numel() for p in model.parameters()):,} parameters, {args.dtype}, {device}, "
          f"{'eval' if args.eval else 'train'} mode), batch {args.batch}×3×{args.image_size}×{args.image_size}: "
          f"{len(families)} families ({found:.1f} s to find and prove)")
    if not families:
        print("nothing to check")
        return 1 if args.family else 0
    # the step is timed first: its warm-up step also warms the allocator and kernels for the check
    step = time_training_step(model, F.cross_entropy, x, y, repeats=args.repeats)
    report = hessian_check(model, families, F.cross_entropy, (x, y), tolerance=args.tolerance,
                           projections=not args.no_projections, seed=args.seed)
    print(report.table())
    failed = sum(not r["passed"] for r in report)
    print(f"{len(report) - failed} of {len(report)} families pass. Check: {report.seconds:.2f} s "
          f"({report.products} Hessian-vector products by {report.method}, {report.passes} forward/backward "
          f"pass{'es' if report.passes > 1 else ''}); training step (forward + backward + SGD, median of "
          f"{args.repeats}): {step:.3f} s; check / step = {report.seconds / step:.1f}")
    return 1 if failed else 0
