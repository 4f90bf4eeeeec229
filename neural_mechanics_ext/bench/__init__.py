"""The benchmark suite (``neural-mechanics bench``): the fused kernels and the tracker against every peer.

Every comparison is made side by side in one process, so that ratios hold on a noisy machine: the
peers of one case are run in interleaved rounds (each round times every peer once, in a rotated order),
and every ratio is the median over rounds of the ratio *within* a round.  Medians, quartiles and the
number of rounds are reported with every time.

Parts (``--parts``):
  moments   ``slice_moments`` on the parameter sets of vgg16_bn, resnet50 and a GPT-2-small-sized
            transformer (θ, g, v; fp32 g and bf16 g) against the eager reference, ``torch.compile`` of
            the reference, ``torch._foreach_norm`` (per-tensor norms: a lower bound on launch
            overhead) and a plain streaming read of the same bytes (the memory floor).
  scaling   time against parameter count (1 M .. 300 M on CPU, .. 2 B on CUDA).
  count     time against the number of tensors at a fixed element count (launch overhead).
  tracker   training-step time with no tracker, a naive tracker (eager per-parameter ops in Python hooks
            with a host sync), and ``SymmetryTracker`` in both hook modes, interleaved in blocks
            on one model.

Definitions used in the tables:
  bytes     Σ over tensors of numel × (bytes per element of θ + g + v): what one pass must read.
  GB/s      bytes / time (10^9 bytes per second), for every peer, so that peers compare on one scale.
  floor     the fastest plain-torch way measured to read the bytes once: per round, the faster of
            ``stream`` (one ``torch.sum`` per tensor of θ, g and v) and ``foreach_norm`` (three
            ``torch._foreach_norm`` calls); it reads the same bytes and does less arithmetic.
  read/copy bandwidth  of the machine, measured on one large contiguous buffer (``sum`` / ``copy_``;
            copy counts the bytes read plus the bytes written).

Modules, one job each: ``params`` (parameter sets), ``peers`` (inputs and peers), ``timing``
(``torch.utils.benchmark`` timers in interleaved rounds), ``cases`` (one moments case), ``tracker``
(workloads and the tracker part, measured by ``app.overhead`` like ``train``'s overhead), ``machine``,
``results`` (goals, markdown, RESULTS.md), ``plot``, ``cli`` (the command).  The names below are what
the repository's ``bench/`` scripts and the smoke test use.
"""
from __future__ import annotations

from .cases import run_case
from .cli import ALL_PARTS, ALL_SETS, add_bench_arguments, bench_main
from .machine import machine_info, section_key
from .params import (ParamSet, SET_BUILDERS, count_set, fmt_count, gpt2_set, gpt2_shapes, resnet50_set,
                     resnet50_shapes, scaling_set, shrink, vgg16_bn_set, vgg16_bn_shapes)
from .peers import (ALL_PEERS, GB, GRAD_DTYPES, MB, READ_PEERS, Inputs, PeerFailed, make_peer, materialize)
from .plot import plot_scaling
from .results import (GOALS, compact_summary, evaluate_goals, moments_table, render_markdown, sweep_table,
                      tracker_table, update_results_file)
from .timing import Deadline, Rounds, bandwidth, floor_rounds, measure, paired_ratios
from .tracker import (TRACKER_VARIANTS, NaiveTracker, Workload, demo_workload, load_factory, tracker_overhead,
                      vgg16_bn_workload)
