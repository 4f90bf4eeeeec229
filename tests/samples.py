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
    # Views of part of a tensor, (A, K, B, offset, a_stride): slice k = flat offset + a*a_stride + k*B + b.
    # GPT-2's c_attn (Conv1D, [E, 3E]): the Q and K column blocks and the whole V block, and the rows.
    ("fused [E, 3E]: Q, K, V column blocks", (6, 18),
     [(1, 6, 18), (6, 6, 1, 0, 18), (6, 6, 1, 6, 18), (6, 1, 6, 12, 18)]),
    ("fused bias: Q and K thirds", (18,), [(1, 6, 1, 0, 6), (1, 6, 1, 6, 6), (1, 1, 18)]),
    # nn.MultiheadAttention's in_proj_weight [3E, E]: Q rows, K rows (V rows read by no view), E = 8.
    ("in_proj [3E, E]: Q and K rows", (24, 8), [(1, 8, 8, 0, 64), (1, 8, 8, 64, 64)]),
    # Llama q_proj [n_heads*hd, E] (4 heads of hd = 4, 2 kv heads, E = 5): RoPE pairs (i, i + hd/2) of
    # the n_rep = 2 query heads of kv head g: (2*n_rep, hd/2, E, g*n_rep*hd*E, hd/2*E), and the rows.
    ("RoPE pairs of q_proj", (16, 5), [(4, 2, 5, 0, 10), (4, 2, 5, 40, 10), (1, 16, 5)]),
    # o_proj [E, n_heads*hd]: the columns of each query head h, (E, hd, 1, h*hd, n_heads*hd).
    ("GQA o_proj column blocks", (5, 16), [(5, 4, 1, 0, 16), (5, 4, 1, 4, 16), (5, 4, 1, 8, 16),
                                          (5, 4, 1, 12, 16), (5, 16, 1)]),
    # Rows with gaps between the a's: layout rows of 4, view rows 2..3, 7..8, 12..13 (a RUN view with
    # stride 5 rows) next to the rows (1, 20, 4).
    ("strided rows with gaps", (20, 4), [(3, 2, 4, 8, 20), (1, 20, 4)]),
    # Overlapping parts, partial rows and columns in one layout, and an odd offset (vector loads of the
    # columns start misaligned).
    ("overlapping partial views", (12, 20), [(12, 5, 2, 3, 20), (1, 3, 20, 40, 60), (4, 2, 5, 25, 20),
                                             (12, 20, 1), (1, 1, 240)]),
    ("disjoint halves", (9, 14), [(9, 7, 1, 0, 14), (9, 7, 1, 7, 14)]),
    # Views that share no layout: a_stride 7 does not divide the 60 elements.
    ("incompatible strides", (60,), [(5, 2, 3, 1, 7), (1, 6, 10), (6, 10, 1)]),
    ("empty partial views", (6, 5), [(0, 3, 5, 10, 5), (2, 0, 5, 7, 5), (2, 3, 0, 30, 0), (1, 6, 5)]),
    # Tall partial columns that cross several items (CPU items are at least 256 rows, GPU items 64k elements).
    ("tall partial columns", (700, 12), [(600, 4, 1, 12 * 50 + 3, 12), (1, 700, 12)]),
    ("wide partial columns", (7, 3000), [(5, 3, 700, 3000 + 500, 3000), (1, 7, 3000)]),
    # Slices of 5 rows, 3 per a, a every 29 rows from row 7: blocks cross GPU items and row-buffer flushes.
    ("tall strided rows", (600, 200), [(20, 3, 5 * 200, 7 * 200, 29 * 200), (1, 600, 200), (1, 1, 120000)]),
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
