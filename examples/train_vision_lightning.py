"""Train a ResNet-18 with Lightning and watch its symmetries.

    pip install ".[lightning,train]"
    python examples/train_vision_lightning.py                   # a few minutes on 2 CPU cores
    neural-mechanics report runs/resnet-lightning/symmetry      # (the script writes the report too)

torchvision's resnet18 built from its config (no weights downloaded), adapted to small images; the data are
the package's generated images (learnable class templates with noise, built in memory from a seed).  SGD with
momentum and weight decay under a cosine schedule: the theory's setting, so the report shows the exact and
the paper's predictions beside the measured values.  The only addition is ``callbacks=[SymmetryCallback()]``.
"""
from __future__ import annotations

import argparse
import os

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchvision

from neural_mechanics_ext.app.data import generated_data
from neural_mechanics_ext.integrations.lightning import SymmetryCallback


class Classifier(pl.LightningModule):
    def __init__(self, num_classes: int, lr: float, steps: int):
        super().__init__()
        self.save_hyperparameters()
        net = torchvision.models.resnet18(num_classes=num_classes)
        net.conv1 = torch.nn.Conv2d(3, 64, 3, padding=1, bias=False)   # small images: no stride-2 stem
        net.maxpool = torch.nn.Identity()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log_dict({"train_loss": loss, "train_acc": (logits.argmax(1) == y).float().mean()}, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=5e-4)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.hparams.steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/resnet-lightning")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--precision", default="32-true", help="e.g. bf16-mixed")
    a = p.parse_args(argv)

    pl.seed_everything(0)
    spec = generated_data(train_samples=a.batch_size * a.accumulation * a.steps, test_samples=0, num_classes=10,
                          image_size=a.image_size, seed=0)
    loader = torch.utils.data.DataLoader(spec.train, batch_size=a.batch_size, shuffle=True, num_workers=0)
    module = Classifier(spec.num_classes, a.lr, a.steps)
    symmetry = SymmetryCallback(os.path.join(a.out, "symmetry"))
    trainer = pl.Trainer(default_root_dir=a.out, max_steps=a.steps, accumulate_grad_batches=a.accumulation,
                         accelerator="auto", devices=1, precision=a.precision, log_every_n_steps=5,
                         logger=pl.loggers.CSVLogger(a.out, name="logs"), callbacks=[symmetry],
                         enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(module, loader)

    timing = symmetry.tracker.timing
    print(f"tracker: {symmetry.tracker.step} optimizer steps, {len(symmetry.tracker.families)} families, "
          f"{timing['hook_seconds'] + timing['process_seconds']:.2f} s of its own work")
    from neural_mechanics_ext.app.report import write_report   # the same as `neural-mechanics report RUN_DIR`
    print("report:", write_report(os.path.join(a.out, "symmetry")))


if __name__ == "__main__":
    main()
