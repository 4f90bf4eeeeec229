"""One generator of slice_moments inputs, used by the reference comparison, opcheck and the dtype/device
tests alike.  Every case is (name, xs, views, ys, zs) with ys/zs None or lists."""
from __future__ import annotations

import torch

# Shapes with the view sets the symmetry families produce, and the awkward ones the planner must handle.
LAYOUTS = [
    ("linear rows+cols", (24, 40), [(1, 24, 40), (24, 40, 1)]),
    ("conv rows+input channels", (16, 8, 3, 3), [(1, 16, 72), (16, 8, 9)]),
    ("flatten block", (10, 6 * 7 * 7), [(1, 10, 294), (10, 6, 49)]),
    ("bias", (37,), [(1, 37, 1)]),
    ("whole tensor", (5, 7, 11), [(1, 1, 385)]),
    ("whole + columns (LayerNorm)", (12, 20), [(1, 1, 240), (12, 20, 1)]),
    ("single element", (1,), [(1, 1, 1)]),
    ("odd sizes, views in two layouts", (6, 10, 3), [(1, 6, 30), (6, 10, 3), (2, 3, 30), (60, 3, 1)]),
    ("repeated view", (9, 13), [(1, 9, 13), (1, 9, 13)]),
    ("periodic rows", (8, 4, 5), [(2, 4, 20)]),
    ("wide rows", (3, 5000), [(1, 3, 5000), (3, 5000, 1)]),
    # The CPU tiles COL items 2048 columns wide: slices of 49 columns straddle two tiles.
    ("flatten block wider than a tile", (6, 64 * 49), [(1, 6, 64 * 49), (6, 64, 49), (6, 64 * 49, 1)]),
    ("tall columns", (1100, 3), [(1100, 3, 1), (1, 1100, 3)]),
    ("classifier 1x1 conv", (10, 16, 1, 1), [(10, 16, 1), (1, 10, 16)]),
]


def make(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


def sample_inputs(device, dtypes=(torch.float32,), seed=0):
    """Yields (name, xs, views, ys, zs) cases on `device` for every dtype triple in `dtypes`."""
    gen = torch.Generator().manual_seed(seed)
    for dx in dtypes:
        for dy in dtypes:
            xs = [make(shape, dx, device, gen) for _, shape, _ in LAYOUTS]
            views = [v for _, _, v in LAYOUTS]
            ys = [make(shape, dy, device, gen) for _, shape, _ in LAYOUTS]
            zs = [make(shape, dx, device, gen) for _, shape, _ in LAYOUTS]
            tag = f"{str(dx)[6:]}/{str(dy)[6:]}"
            yield f"all layouts {tag}", xs, views, ys, zs
            yield f"y only {tag}", xs, views, ys, None
            yield f"z only {tag}", xs, views, None, zs
            yield f"x only {tag}", xs, views, None, None
            # Entries may be missing per tensor (a parameter without gradient or buffer yet).
            yield f"some absent {tag}", xs, views, [y if i % 2 else None for i, y in enumerate(ys)], \
                [None if i % 3 else z for i, z in enumerate(zs)]
    for name, shape, vs in LAYOUTS:
        x = make(shape, torch.float32, device, gen)
        yield f"{name} alone", [x], [vs], [make(shape, torch.float32, device, gen)], [make(shape, torch.float32, device, gen)]
