"""Overhead of the framework callbacks on their own workload: tracked vs untracked transformers.Trainer steps.

    python bench/integrations_overhead.py                  # about 3 minutes on 2 CPU cores
    python bench/integrations_overhead.py --json out.json

Workload: the Llama of examples/train_llama_hf.py (about 3 M parameters, byte-level, AdamW, warmup + cosine,
gradient accumulation 2, fp32 on CPU), ``SymmetryCallback`` at its default settings with the families given
(discovery is a one-time cost, timed separately), scalars logged every ``--logging-steps``.

Paired rounds: each round trains a fresh tracked and a fresh untracked Trainer for ``--steps`` optimizer
steps from the same initial weights on the same batches, in alternating order; a step's time is the interval
between consecutive ``on_step_end`` events (forward, backward, optimizer, the tracker's hook, and the logging
and flushing that follow the step).  The first two steps of each run are warm-up.  Reported: the median over
rounds of (median tracked step) / (median untracked step), its quartiles, and the tracker's own timers per
step (what the remaining cost is made of).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import neural_mechanics_ext as nmx
from neural_mechanics_ext.integrations.huggingface import SymmetryCallback

_spec = importlib.util.spec_from_file_location(
    "train_llama_hf", os.path.join(os.path.dirname(__file__), "..", "examples", "train_llama_hf.py"))
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


class StepClock(TrainerCallback):
    """Intervals between consecutive optimizer-step ends."""

    def __init__(self):
        self.last, self.intervals = None, []

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self.last is not None:
            self.intervals.append(now - self.last)
        self.last = now


def build(hidden: int, layers: int, seq_len: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=hidden,
                                        intermediate_size=int(hidden * 8 / 3) // 16 * 16, num_hidden_layers=layers,
                                        num_attention_heads=max(1, hidden // 64),
                                        num_key_value_heads=max(1, hidden // 128), max_position_embeddings=seq_len))


def run(a, data, families, tracked: bool, out: str):
    clock = StepClock()
    callbacks = [clock] + ([SymmetryCallback(os.path.join(out, "symmetry"), families=families)] if tracked else [])
    args = TrainingArguments(out, max_steps=a.steps, per_device_train_batch_size=a.batch_size,
                             gradient_accumulation_steps=2, learning_rate=2e-3, weight_decay=0.1, optim="adamw_torch",
                             lr_scheduler_type="cosine", warmup_steps=2, logging_steps=a.logging_steps,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                             dataloader_num_workers=0)
    trainer = Trainer(model=build(a.hidden, a.layers, a.seq_len), args=args, train_dataset=data, callbacks=callbacks)
    trainer.train()
    steps = clock.intervals[1:]   # the interval ending at step 2 onward (steps 1-2 warm up)
    timing = callbacks[-1].tracker.timing if tracked else None
    return statistics.median(steps), timing


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--json", help="write the result here")
    a = p.parse_args(argv)

    data = example.ByteBlocks(example.stdlib_corpus(2**20), a.seq_len)
    ids = data[0]["input_ids"][None].repeat(8, 1)
    t0 = time.perf_counter()
    families = nmx.find_symmetries(build(a.hidden, a.layers, a.seq_len), {"input_ids": ids, "labels": ids},
                                   loss=lambda o, _: o.loss, targets=())
    discovery_s = time.perf_counter() - t0
    ratios, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            order = (True, False) if r % 2 == 0 else (False, True)
            result = {}
            for tracked in order:
                result[tracked] = run(a, data, families, tracked, os.path.join(tmp, f"r{r}-{tracked}"))
            (t_on, timing), (t_off, _) = result[True], result[False]
            ratios.append(t_on / t_off)
            per_step = {k: v / a.steps for k, v in timing.items()}
            rows.append({"tracked_s": t_on, "untracked_s": t_off, "tracker_per_step_s": per_step})
            print(f"round {r}: tracked {t_on * 1e3:.1f} ms/step, untracked {t_off * 1e3:.1f} ms/step, "
                  f"ratio {t_on / t_off:.4f}; tracker's own: hook {per_step['hook_seconds'] * 1e3:.2f} ms, "
                  f"processing {per_step['process_seconds'] * 1e3:.2f} ms, "
                  f"writing {per_step['write_seconds'] * 1e3:.2f} ms per step")
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    hook = statistics.median(r["tracker_per_step_s"]["hook_seconds"] for r in rows)
    process = statistics.median(r["tracker_per_step_s"]["process_seconds"] for r in rows)
    write = statistics.median(r["tracker_per_step_s"]["write_seconds"] for r in rows)
    untracked = statistics.median(r["untracked_s"] for r in rows)
    parameters = sum(p.numel() for p in build(a.hidden, a.layers, a.seq_len).parameters())
    summary = {"workload": vars(a) | {"families": len(families), "groups": sum(f.num_groups for f in families),
                                      "parameters": parameters},
               "discovery_s": discovery_s, "ratio_median": statistics.median(ratios),
               "ratio_quartiles": [q[0], q[2]],
               "untracked_step_s": untracked, "tracker_hook_s_per_step": hook, "tracker_process_s_per_step": process,
               "tracker_write_s_per_step": write,
               "tracker_timers_percent": 100 * (hook + process + write) / untracked, "rounds": rows,
               "load_average": os.getloadavg()}
    print(f"overhead: median ratio {summary['ratio_median']:.4f} (quartiles {q[0]:.4f}..{q[2]:.4f}) over {a.rounds} "
          f"paired rounds; the tracker's own timers (hook, processing, run-folder writes): "
          f"{summary['tracker_timers_percent']:.2f}% of an untracked step "
          f"({untracked * 1e3:.0f} ms); discovery (once) {discovery_s:.1f} s; load average {os.getloadavg()[0]:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
