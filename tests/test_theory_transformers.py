"""The tracker's exact predictions on transformers (issue 13 item 8): a float64 SGD-with-momentum run of a tiny
Llama (RoPE, grouped-query attention, SwiGLU) and a tiny GPT-2 (fused Conv1D c_attn), tracking every family
that discovery finds (Q/K per rotation pair, V/O per kv head, norm ↔ readers, SwiGLU, translations, the key
bias, the residual stream's scale), with weight decay.  Each family's exact prediction must follow the empirical quantity to ≤ 1e-10 relative.

Why these symmetries are exact here: Q/K, V/O, SwiGLU and norm ↔ readers are rescales compensated exactly
by the readers' weights; the translations are absorbed by LayerNorm's mean subtraction or by cross-entropy,
both exact for any eps.  The residual stream's scale (joint: every writer of the stream × α) is absorbed by
the normalisers' scale invariance, which their eps breaks at O(eps/var) (THEORY_TRANSFORMERS.md): the models
are built with eps = 1e-30 (exact in float64; torch refuses 0).  HF's float32 round trip inside
``LlamaRMSNorm`` would make every symmetry float32-exact only: the training forward runs under
:class:`KeepFloat64` (casts of float64 tensors to a lower precision are no-ops).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import neural_mechanics_ext as nmx
from neural_mechanics_ext.symmetry.float64 import KeepFloat64

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

V, STEPS = 13, 40


def llama():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                   tie_word_embeddings=False, attn_implementation="sdpa", rms_norm_eps=1e-30)
    return transformers.LlamaForCausalLM(cfg)


def gpt2(tied=False):
    """GPT-2 initialises its biases at 0: the key bias (zero gradient in exact arithmetic) would stay at 0 and
    its relative error would divide rounding by rounding (``summary.add_magnitudes``' near_zero); random
    biases give every family a quantity of order 1.  Tied (the default GPT-2): the stream's rescale against
    ln_f and the whole wte's translation read the tied tensor's gradient, the sum over both its uses."""
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=8, n_embd=8, n_layer=2, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tied, layer_norm_epsilon=1e-30)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.3)
    return model


KINDS = {"scale", "rescale", "translation"}      # scale: the residual stream


def gpt2_tied():
    return gpt2(tied=True)


@pytest.mark.parametrize("make, kinds", [(llama, KINDS), (gpt2, KINDS), (gpt2_tied, {"rescale", "translation"})],
                         ids=["llama-gqa", "gpt2", "gpt2-tied"])
def test_exact_predictions_on_a_tiny_transformer(make, kinds):
    torch.manual_seed(0)
    model = make().double().train()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, V, (4, 6), generator=gen) for _ in range(STEPS)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracker = nmx.SymmetryTracker(model, opt, {"input_ids": batches[0], "labels": batches[0]})
    rows = tracker.summary()
    names = [r["family"] for r in rows]
    assert any("query·key" in n for n in names) and any("o_proj" in n or "c_proj" in n for n in names)
    for x in batches:
        with KeepFloat64():
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    tracker.sync()
    rows = tracker.summary()
    tracker.close()
    assert {r["kind"] for r in rows} == kinds
    print(f"{make.__name__}: {len(rows)} families, max exact error "
          f"{max(r['error_exact'] for r in rows):.1e}, max residual {max(r['residual'] for r in rows):.1e}")
    for r in rows:
        assert r["steps"] == STEPS, r
        assert r["error_exact"] <= 1e-10, (r["family"], r["error_exact"])
        assert r["residual"] <= 1e-9, (r["family"], r["residual"])
