"""Train a small Llama-style causal LM with the Hugging Face Trainer and watch its symmetries.

    pip install ".[huggingface,plot]"
    python examples/train_llama_hf.py                       # ~3 min on 2 CPU cores
    neural-mechanics report runs/llama-hf/symmetry          # (the script writes the report too)

The model is built from a ``LlamaConfig`` (about 3.5 M parameters, nothing downloaded); the text is real:
the bytes of the Python standard library's own source files, a byte-level corpus every machine with Python
has.  Training is what a Trainer user runs: AdamW (weight decay off for biases and norm weights), warmup +
cosine, gradient accumulation, optional bf16.  The only addition is ``callbacks=[SymmetryCallback()]``.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import sysconfig

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from neural_mechanics_ext.integrations.huggingface import SymmetryCallback


class ByteBlocks(torch.utils.data.Dataset):
    """Consecutive blocks of ``length`` bytes of ``data``; each is its own label (the model shifts)."""

    def __init__(self, data: bytes, length: int):
        usable = len(data) // length * length
        self.blocks = torch.frombuffer(bytearray(data[:usable]), dtype=torch.uint8).long().view(-1, length)

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def stdlib_corpus(max_bytes: int) -> bytes:
    """The Python standard library's top-level source files, in name order, up to ``max_bytes``."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    parts, size = [], 0
    for path in files:
        with open(path, "rb") as f:
            parts.append(f.read())
        size += len(parts[-1])
        if size >= max_bytes:
            break
    if not parts:
        raise FileNotFoundError(f"no .py files under {sysconfig.get_paths()['stdlib']}")
    return b"\n".join(parts)[:max_bytes]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/llama-hf")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--corpus-mb", type=float, default=4.0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU or GPU)")
    p.add_argument("--report-to", default="none", help="tensorboard, wandb, mlflow... (Trainer's report_to)")
    a = p.parse_args(argv)

    torch.manual_seed(0)
    data = stdlib_corpus(int(a.corpus_mb * 2**20))
    train = ByteBlocks(data, a.seq_len)
    config = LlamaConfig(vocab_size=256, hidden_size=a.hidden, intermediate_size=int(a.hidden * 8 / 3) // 16 * 16,
                         num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64,
                         num_key_value_heads=max(1, a.hidden // 128), max_position_embeddings=a.seq_len)
    model = LlamaForCausalLM(config)
    print(f"Llama: {sum(q.numel() for q in model.parameters()) / 1e6:.2f} M parameters; corpus: "
          f"{len(data) / 2**20:.1f} MB of Python standard library source ({len(train)} blocks of {a.seq_len} bytes)")

    args = TrainingArguments(
        a.out, max_steps=a.steps, per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=a.accumulation, learning_rate=a.lr, weight_decay=0.1,
        adam_beta2=0.95, optim="adamw_torch", lr_scheduler_type="cosine", warmup_steps=max(1, a.steps // 10),
        max_grad_norm=1.0, bf16=a.bf16, logging_steps=10, save_strategy="no", report_to=a.report_to,
        seed=0, dataloader_num_workers=0, disable_tqdm=True)
    symmetry = SymmetryCallback(os.path.join(a.out, "symmetry"))
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[symmetry])
    result = trainer.train()
    print(f"final training loss {result.training_loss:.3f} nats/byte averaged over the run "
          f"({result.training_loss / math.log(2):.2f} bits/byte); last logged "
          f"{[h['loss'] for h in trainer.state.log_history if 'loss' in h][-1]:.3f}")

    timing = symmetry.tracker.timing
    print(f"tracker: {symmetry.tracker.step} optimizer steps, {len(symmetry.tracker.families)} families, "
          f"{timing['hook_seconds'] + timing['process_seconds']:.2f} s of its own work")
    from neural_mechanics_ext.app.report import write_report   # the same as `neural-mechanics report RUN_DIR`
    print("report:", write_report(os.path.join(a.out, "symmetry")))


if __name__ == "__main__":
    main()
