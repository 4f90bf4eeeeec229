"""Discovery on Hugging Face transformers built from configs (no download): tiny GPT-2 (Conv1D layers:
``addmm(b, x, W)`` with ``W`` [in, out]) and tiny Llama (hand-written RMSNorm, RoPE, SwiGLU, eager and sdpa
attention, grouped-query attention), float64, train mode, dropout 0, with the model's own ``outputs.loss``.

Every expected family is derived by hand below (THEORY_TRANSFORMERS.md), each is proved by the library and
checked here independently by its finite transformation (random α per group applied to a float64 copy,
the loss must not move).  Attention: Q/K per (head, dim) — per (kv head, rotation pair) under RoPE, with
every query head sharing the kv head — and V/O per (kv head, dim) with the o_proj columns of every query
head of the group, for separate projections (Llama, Qwen2, Mistral, BERT), the fused ``c_attn`` of GPT-2,
timm's fused ``qkv`` and ``nn.MultiheadAttention``'s packed ``in_proj_weight`` (torchvision ViT), the same
with ``eager`` and ``sdpa`` attention.  Views ``(A, K, B, offset, a_stride)`` address the parts.  Key-bias
translations, one group per key-bias element (``q·(k_t + c)`` shifts every logit of a query alike: the softmax
does not see it), for separate key projections (BERT), the key part of a fused one (GPT-2, timm) and inside
``multi_head_attention_forward`` (torchvision), never under RoPE (Qwen2), never for a query or value bias.
QK-norm (Qwen3 and timm per head, OLMo2 over the whole projection): the q/k projections' scale absorbed by the
norm, q_norm γ ↔ k_norm γ per rotation pair, and no Q/K rescale of the projections' rows.  Joint families
(every writer of a stream scaled at once): the residual stream's scale (pre-norm; a rescale against the final
norm when the embedding is tied), BERT's embedding tables and post-LN sublayer rescales; the class token's
translation.
"""
from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

from neural_mechanics_ext import find_symmetries
from neural_mechanics_ext.symmetry.eps_limit import NormaliserWatch
from neural_mechanics_ext.symmetry.float64 import KeepFloat64
from neural_mechanics_ext.views import full, strided

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

V, E, L = 13, 8, 2            # vocabulary, width, layers
TOKENS = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(0))
BATCH = {"input_ids": TOKENS, "labels": TOKENS}


def W(name, view, sign=1):
    return (name, tuple(view), sign)


def S(kind, *members):
    return kind, frozenset(members)


def fam_set(families):
    sigs = [(f.kind, frozenset(f.members)) for f in families]
    assert len(sigs) == len(set(sigs)), "duplicate families"
    return set(sigs)


def discover(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # HF config warnings
        return find_symmetries(model, BATCH, return_rejected=True, prove=not os.environ.get("NOPROVE"))


IMAGES = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
CLASSES = torch.tensor([0, 2])


def loss_of(model, eps_limit=False, mask=None):
    """The loss in float64; ``eps_limit``: with every normaliser's eps → 0 (where the residual stream's
    scale is exact)."""
    with KeepFloat64(), torch.no_grad(), NormaliserWatch(eps_limit):   # HF's RMSNorm casts to float32
        if isinstance(model, transformers.PreTrainedModel):
            return float(model(**BATCH, attention_mask=mask).loss
                         if "Causal" in type(model).__name__ or "LMHead" in type(model).__name__
                         else model(input_ids=TOKENS, attention_mask=mask, labels=CLASSES).loss)
        return float(torch.nn.functional.cross_entropy(model(IMAGES), CLASSES))


def check_finite_transformation(model, fam, seed=0, mask=None):
    """Apply the family's transformation (scale/rescale: θ_A1·α, θ_A2/α; translation: θ_A + α) with a random
    α per group to a float64 copy: the loss stays the same to rounding (with normaliser eps → 0 for a family
    that a normaliser's eps makes approximate)."""
    gen = torch.Generator().manual_seed(seed)
    k = fam.num_groups
    m = copy.deepcopy(model)
    named = dict(m.named_parameters(remove_duplicate=False))
    if fam.kind == "translation":
        alpha = torch.rand(k, generator=gen, dtype=torch.float64) * 2 - 1
    else:
        alpha = torch.rand(k, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    with torch.no_grad():
        for name, view, sign in fam.members:
            th = strided(named[name].data.view(-1), full(view, named[name].numel()))
            if fam.kind == "translation":
                th += sign * alpha.view(1, k, 1)
            else:
                th *= alpha.view(1, k, 1) ** sign
    limit = "approx" in fam.extra
    before, after = loss_of(model, limit, mask), loss_of(m, limit, mask)
    assert abs(after - before) <= 1e-11 * max(1.0, abs(before)), (fam.name, before, after)


def check_proved(model, fams, mask=None):
    """Every family proved and exact, except the joint scale of the residual stream, which normalisers
    absorb: approximate at the models' eps, exact as eps → 0.  (Where a normaliser absorbs with eps 1e-30,
    eps/var ~ 1e-24 adds nothing that counts to the tolerance.)"""
    assert len({f.name for f in fams}) == len(fams)
    for f in fams:
        assert f.residual <= f.tolerance, (f.name, f.residual, f.tolerance)
        if f.tolerance != pytest.approx(1e-8, rel=1e-9):
            assert "joint" in f.name and f.extra["residual_eps_limit"] <= 1e-12, f.name
        check_finite_transformation(model, f, mask=mask)


def stream(kind, *writers, against=()):
    """The residual stream's family (THEORY_TRANSFORMERS.md): every writer (whole tensor, one group) × α —
    and ``against`` × 1/α: the final norm when tied, the readers of a stream without pre-norms (OLMo2)."""
    return S(kind, *[W(n, (1, 1, numel)) for n, numel in writers], *[W(n, (1, 1, numel), -1) for n, numel in against])


def perturb(model):
    """Non-trivial normaliser affines and biases, so no check passes by accident."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any("norm" in t or t.startswith("ln") for t in n.lower().split(".")[:-1]):
                p.copy_(torch.rand_like(p) + 0.5 if n.endswith("weight") else torch.randn_like(p) * 0.1)
            elif n.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.3)
    return model


# ---------------------------------------------------------------------- GPT-2
def gpt2(tied: bool, attn: str = "eager"):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=8, n_embd=E, n_layer=L, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tied,
                                  attn_implementation=attn)
    model = transformers.GPT2LMHeadModel(cfg).double().train()
    with torch.no_grad():      # non-trivial LayerNorm affines, so no check passes by accident
        for n, p in model.named_parameters():
            if "ln_" in n:
                p.copy_(torch.rand_like(p) + 0.5 if n.endswith("weight") else torch.randn_like(p) * 0.1)
    return model


def gpt2_expected(tied: bool):
    """Per block l (c_attn [E, 3E], c_fc [E, 4E], c_proj [in, E]: Conv1D weights are [in, out]):
    * ln_1 (γ, β) channel j ↔ c_attn row j, ln_2 ↔ c_fc row j (rescale; the readers' ROWS are their inputs);
    * attn.c_proj and mlp.c_proj write the residual stream, which only LayerNorms read: shifting input row j
      of W adds α·x_j to every channel of a position (translation, rows), and their bias shifted as a whole
      (one group: the LayerNorms merge the channels);
    * Q/K (rescale, E groups j = h·d + i; no RoPE, no GQA, so one family): c_attn column j and bias j
      (query) × α, column E + j and bias E + j (key) × 1/α.  Column j of W [E, 3E] is the flat elements
      j + r·3E: view (E, E, 1, 0, 3E); the key block starts at E;
    * V/O (rescale, E groups): c_attn column 2E + j and bias 2E + j ↔ attn.c_proj row j (its input);
    * key bias (translation, E groups, one per element): c_attn bias E + j, view (1, E, 1, E, E) — the
      key part of the fused bias; the query and value parts are not symmetries.
    Plus wpe rows (a position's shift is uniform over channels), and when untied: wte rows, ln_f ↔ lm_head
    columns (rescale), lm_head columns (translation: cross-entropy).  Tied, the last three are refused (the
    same tensor is the embedding and the lm_head).  The residual stream (joint, one group): wte, wpe and
    both c_proj of every block (weights and biases) × α, which only LayerNorms read — a scale group untied;
    tied, the lm_head would scale the logits, so it is a rescale against ln_f (γ, β) × 1/α.  Tied, the whole
    wte is one translation group instead of its rows (the stream shifts alike everywhere, each position's
    logits by one value).  Not symmetries: c_fc's units (GELU is not homogeneous), any LayerNorm β alone (it
    reaches a Conv1D, not an absorber).  23 families untied (1 + 9 L + 3 + 1), 21 tied (1 + 9 L + 1 + 1)."""
    h = "transformer.h"
    fams = {S("translation", W("transformer.wpe.weight", (1, 8, E)))}
    for i in range(L):
        a = f"{h}.{i}.attn"
        fams |= {
            S("rescale", W(f"{h}.{i}.ln_1.weight", (1, E, 1)), W(f"{h}.{i}.ln_1.bias", (1, E, 1)),
              W(f"{a}.c_attn.weight", (1, E, 3 * E), -1)),
            S("rescale", W(f"{h}.{i}.ln_2.weight", (1, E, 1)), W(f"{h}.{i}.ln_2.bias", (1, E, 1)),
              W(f"{h}.{i}.mlp.c_fc.weight", (1, E, 4 * E), -1)),
            S("translation", W(f"{a}.c_proj.weight", (1, E, E))),
            S("translation", W(f"{a}.c_proj.bias", (1, 1, E))),
            S("translation", W(f"{h}.{i}.mlp.c_proj.weight", (1, 4 * E, E))),
            S("translation", W(f"{h}.{i}.mlp.c_proj.bias", (1, 1, E))),
            S("rescale", W(f"{a}.c_attn.weight", (E, E, 1, 0, 3 * E)), W(f"{a}.c_attn.bias", (1, E, 1, 0, E)),
              W(f"{a}.c_attn.weight", (E, E, 1, E, 3 * E), -1), W(f"{a}.c_attn.bias", (1, E, 1, E, E), -1)),
            S("rescale", W(f"{a}.c_attn.weight", (E, E, 1, 2 * E, 3 * E)), W(f"{a}.c_attn.bias", (1, E, 1, 2 * E, E)),
              W(f"{a}.c_proj.weight", (1, E, E), -1)),
            S("translation", W(f"{a}.c_attn.bias", (1, E, 1, E, E))),
        }
    writers = [("transformer.wte.weight", V * E), ("transformer.wpe.weight", 8 * E)]
    for i in range(L):
        writers += [(f"{h}.{i}.attn.c_proj.weight", E * E), (f"{h}.{i}.attn.c_proj.bias", E),
                    (f"{h}.{i}.mlp.c_proj.weight", 4 * E * E), (f"{h}.{i}.mlp.c_proj.bias", E)]
    fams.add(stream("rescale", *writers, against=[("transformer.ln_f.weight", E), ("transformer.ln_f.bias", E)])
             if tied else stream("scale", *writers))
    if tied:
        fams.add(S("translation", W("transformer.wte.weight", (1, 1, V * E))))
    if not tied:
        fams |= {
            S("translation", W("transformer.wte.weight", (1, V, E))),
            S("rescale", W("transformer.ln_f.weight", (1, E, 1)), W("transformer.ln_f.bias", (1, E, 1)),
              W("lm_head.weight", (V, E, 1), -1)),
            S("translation", W("lm_head.weight", (V, E, 1))),
        }
    return fams


@pytest.mark.parametrize("tied, attn", [(False, "eager"), (True, "eager"), (False, "sdpa")],
                         ids=["untied", "tied", "untied-sdpa"])
def test_gpt2(tied, attn):
    model = gpt2(tied, attn)
    fams, rejected = discover(model)
    expected = gpt2_expected(tied)
    assert len(expected) == (21 if tied else 23)
    assert fam_set(fams) == expected
    check_proved(model, fams)
    tied_refusals = [r for r in rejected if "is tied" in r.reason]
    assert len(tied_refusals) == (3 if tied else 0) and all(r.residual is None for r in tied_refusals)


# ---------------------------------------------------------------------- Llama
def llama(kv_heads: int, attn: str, tied: bool = False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=2 * E, intermediate_size=24, num_hidden_layers=L,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=16,
                                   tie_word_embeddings=tied, attn_implementation=attn)
    model = transformers.LlamaForCausalLM(cfg).double().train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(torch.rand_like(p) + 0.5)
    return model


def attention_expected(prefix: str, D: int, H: int, G: int, d: int, rope: bool, bias: bool):
    """Q/K and V/O of one attention layer with separate q/k/v/o projections (H query heads, G kv heads of
    dim d, n = H/G query heads per kv head; W [out, in] so a row is D flat elements).
    * Q/K: query row h·d + i ↔ key row g·d + i, for every query head h of kv head g (they all meet that
      key).  Under RoPE (HF rotate_half: dims i and i + d/2 rotate together) the group is the rotation pair:
      rows i and i + d/2 of each of the n query heads, i.e. the flat rows g·n·d + a·d/2 + i for a < 2n —
      view (2n, d/2, D, g·n·d·D, d/2·D) — against key rows (2, d/2, D, g·d·D, d/2·D); groups i < d/2 of
      one kv head form a family (the next kv head's rows are not a further slice of the same view).
      Without RoPE and GQA: query row j ↔ key row j, one family of whole-tensor views.
    * V/O: value row g·d + i ↔ o_proj column h·d + i for every query head h of kv head g: view
      (1, d, D, g·d·D, d·D) of v_proj, one (D, d, 1, h·d, H·d) of o_proj per query head; one family per kv
      head.  Without GQA: v_proj rows (1, D·, D) ↔ o_proj columns (H·d, H·d, 1), one family.
    Biases (Qwen2: q, k, v) move with their rows."""
    q, k, v, o = (f"{prefix}.{x}_proj" for x in "qkvo")
    n, hd = H // G, H * d
    fams = set()
    if rope:
        for g in range(G):
            m = [W(f"{q}.weight", (2 * n, d // 2, D, g * n * d * D, d // 2 * D)),
                 W(f"{k}.weight", (2, d // 2, D, g * d * D, d // 2 * D), -1)]
            if bias:
                m += [W(f"{q}.bias", (2 * n, d // 2, 1, g * n * d, d // 2)),
                      W(f"{k}.bias", (2, d // 2, 1, g * d, d // 2), -1)]
            fams.add(S("rescale", *m))
    else:
        assert G == H
        m = [W(f"{q}.weight", (1, hd, D)), W(f"{k}.weight", (1, hd, D), -1)]
        m += [W(f"{q}.bias", (1, hd, 1)), W(f"{k}.bias", (1, hd, 1), -1)] if bias else []
        fams.add(S("rescale", *m))
    if G == H:
        m = [W(f"{v}.weight", (1, hd, D)), W(f"{o}.weight", (D, hd, 1), -1)]
        fams.add(S("rescale", *(m + ([W(f"{v}.bias", (1, hd, 1))] if bias else []))))
    else:
        for g in range(G):
            m = [W(f"{v}.weight", (1, d, D, g * d * D, d * D))]
            m += [W(f"{v}.bias", (1, d, 1, g * d, d))] if bias else []
            m += [W(f"{o}.weight", (D, d, 1, h * d, hd), -1) for h in range(g * n, (g + 1) * n)]
            fams.add(S("rescale", *m))
    return fams


def llama_expected(kv_heads: int, tied: bool, bias: bool = False):
    """Width D = 16, 4 query heads of dim 4, intermediate 24.  Per layer:
    * input_layernorm γ_j (HF writes RMSNorm by hand: x·rsqrt(mean(x²) + eps), then weight·x) ↔ column j of
      q, k and v_proj (rescale);
    * post_attention_layernorm γ_j ↔ column j of gate and up_proj (rescale);
    * SwiGLU: up_proj row i ↔ down_proj column i (silu(gate)·up is linear in up; gate ↔ down is not);
    * Q/K per (kv head, rotation pair) and V/O per (kv head, dim): :func:`attention_expected`.
    Plus, untied: final norm γ_j ↔ lm_head column j (rescale) and lm_head columns (translation); tied, both
    are refused.  The residual stream (joint, one group): embed_tokens, o_proj and down_proj of every layer
    × α (only RMSNorms read the stream): a scale group untied, a rescale against the final norm's γ × 1/α
    tied.  Not symmetries, not found: Q/K per dimension (RoPE mixes dims i and i + d/2), the embedding's
    rows (RMSNorm subtracts no mean), any output unit of o_proj/down_proj alone (residual join).
    Per layer 3 + G (Q/K) + (1 without GQA, G with it) (V/O): 4 kv heads: 8 L + 2 + 1 = 19; 2 kv heads:
    7 L + 2 + 1 = 17; tied, 4 kv heads: 8 L + 1 = 17."""
    D, Q = 2 * E, "model.layers"
    fams = set()
    for i in range(L):
        fams |= {
            S("rescale", W(f"{Q}.{i}.input_layernorm.weight", (1, D, 1)),
              W(f"{Q}.{i}.self_attn.q_proj.weight", (D, D, 1), -1),
              W(f"{Q}.{i}.self_attn.k_proj.weight", (kv_heads * 4, D, 1), -1),
              W(f"{Q}.{i}.self_attn.v_proj.weight", (kv_heads * 4, D, 1), -1)),
            S("rescale", W(f"{Q}.{i}.post_attention_layernorm.weight", (1, D, 1)),
              W(f"{Q}.{i}.mlp.gate_proj.weight", (24, D, 1), -1), W(f"{Q}.{i}.mlp.up_proj.weight", (24, D, 1), -1)),
            S("rescale", W(f"{Q}.{i}.mlp.up_proj.weight", (1, 24, D)), W(f"{Q}.{i}.mlp.down_proj.weight", (D, 24, 1), -1)),
        }
        fams |= attention_expected(f"{Q}.{i}.self_attn", D, 4, kv_heads, 4, rope=True, bias=bias)
    writers = [("model.embed_tokens.weight", V * D)]
    for i in range(L):
        writers += [(f"{Q}.{i}.self_attn.o_proj.weight", D * D), (f"{Q}.{i}.mlp.down_proj.weight", 24 * D)]
    fams.add(stream("rescale", *writers, against=[("model.norm.weight", D)]) if tied else stream("scale", *writers))
    if not tied:
        fams |= {S("rescale", W("model.norm.weight", (1, D, 1)), W("lm_head.weight", (V, D, 1), -1)),
                 S("translation", W("lm_head.weight", (V, D, 1)))}
    return fams


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["MHA", "GQA"])
def test_llama_eager_and_sdpa_agree(kv_heads):
    expected = llama_expected(kv_heads, tied=False)
    assert len(expected) == (19 if kv_heads == 4 else 17)
    for attn in ("eager", "sdpa"):
        model = llama(kv_heads, attn)
        fams, rejected = discover(model)
        assert fam_set(fams) == expected, attn
        check_proved(model, fams)
        assert not [r for r in rejected if "view" in r.reason]


def decoder(arch, attn="sdpa", **extra):
    """A tiny ``{arch}ForCausalLM``: width 16, 4 query heads of dim 4, 2 kv heads, intermediate 24, untied
    (unless ``extra`` says otherwise);
    non-trivial norm weights and biases."""
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{arch}Config")(
        vocab_size=V, hidden_size=2 * E, intermediate_size=24, num_hidden_layers=L, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16, attn_implementation=attn,
        **{"tie_word_embeddings": False, **extra})
    model = getattr(transformers, f"{arch}ForCausalLM")(cfg).double().train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(torch.rand_like(p) + 0.5)
            if n.endswith("bias"):
                p.copy_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("arch", ["Qwen2", "Mistral"])
def test_qwen2_and_mistral(arch):
    """Llama's families (RoPE, GQA with 2 kv heads); Qwen2's q/k/v biases move with their rows.  Qwen2's
    k_proj bias is NOT a translation: RoPE rotates it by a position-dependent R_t, so q·R_t c differs
    between keys."""
    model = decoder(arch)
    fams, _ = discover(model)
    expected = llama_expected(2, tied=False, bias=arch == "Qwen2")
    assert len(expected) == 17
    assert fam_set(fams) == expected
    check_proved(model, fams)


def qk_norm_expected(arch):
    """QK-norm: an RMSNorm on the queries and on the keys before RoPE (widths as :func:`decoder`: D = 16,
    H = 4 query heads and G = 2 kv heads of dim d = 4, n = 2 query heads per kv head).  In both, the Q/K
    rescale of the projections' rows does not hold (the norm divides a scaled row by the norm of its whole
    set) and is not found.
    * Qwen3 (pre-norm; q_norm/k_norm of width d, shared by every head, applied per head):
      - q_proj scale per query head (scale, the head's d rows; the norm absorbs it): view (1, H, d·D);
        k_proj per kv head: (1, G, d·D);
      - q_norm γ ↔ k_norm γ (rescale) per rotation pair (i, i + d/2), one group for every head (γ is
        shared): views (2, d/2, 1) of both, d/2 = 2 groups;
      - Llama's input_layernorm ↔ q/k/v columns, post_attention_layernorm ↔ gate/up, up ↔ down, V/O per
        kv head (2 families), final norm ↔ lm_head, lm_head columns.
      Per layer 3 + 2 (V/O) + 3 = 8, and the residual stream's scale as in Llama: 8 L + 2 + 1 = 19.
    * OLMo2 (post-norm: the attention and MLP outputs are normalised before the residual; q_norm over all
      H·d query features, k_norm over all G·d key features):
      - q_proj and k_proj scale, one group each (the norm spans the whole projection): (1, 1, numel);
      - q_norm γ ↔ k_norm γ per (kv head g, rotation pair), with the n query heads reading g:
        q_norm (2n, d/2, 1, g·n·d, d/2), k_norm (2, d/2, 1, g·d, d/2) × 1/α; one family per kv head;
      - o_proj scale (post_attention_layernorm absorbs it), down_proj scale (post_feedforward_layernorm),
        one group each; up ↔ down; V/O per kv head (2 families);
      - no norm ↔ readers inside a layer (the q/k/v and gate/up projections read the residual stream);
        final norm ↔ lm_head, lm_head columns;
      - the residual stream (joint): its writers — embed_tokens and both post-norms' γ of every layer — × α
        against its readers — q, k, v, gate and up of every layer — × 1/α (the final norm absorbs it): one
        rescale.
      Per layer 2 + 2 + 2 + 1 + 1 + 1 = 9: 9 L + 2 + 1 = 21."""
    D, H, G, d, n, Q = 2 * E, 4, 2, 4, 2, "model.layers"
    fams = {S("rescale", W("model.norm.weight", (1, D, 1)), W("lm_head.weight", (V, D, 1), -1)),
            S("translation", W("lm_head.weight", (V, D, 1)))}
    writers, readers = [("model.embed_tokens.weight", V * D)], []
    for i in range(L):
        a, m = f"{Q}.{i}.self_attn", f"{Q}.{i}.mlp"
        if arch == "Qwen3":
            writers += [(f"{a}.o_proj.weight", D * H * d), (f"{m}.down_proj.weight", 24 * D)]
        else:
            writers += [(f"{Q}.{i}.post_attention_layernorm.weight", D), (f"{Q}.{i}.post_feedforward_layernorm.weight", D)]
            readers += [(f"{a}.q_proj.weight", H * d * D), (f"{a}.k_proj.weight", G * d * D),
                        (f"{a}.v_proj.weight", G * d * D), (f"{m}.gate_proj.weight", 24 * D), (f"{m}.up_proj.weight", 24 * D)]
    fams.add(stream("rescale" if readers else "scale", *writers, against=readers))
    for i in range(L):
        a = f"{Q}.{i}.self_attn"
        fams |= {f for f in attention_expected(a, D, H, G, d, rope=True, bias=False)     # V/O only
                 if not any(name.endswith("q_proj.weight") for name, _, _ in f[1])}
        fams.add(S("rescale", W(f"{Q}.{i}.mlp.up_proj.weight", (1, 24, D)),
                   W(f"{Q}.{i}.mlp.down_proj.weight", (D, 24, 1), -1)))
        if arch == "Qwen3":
            fams |= {
                S("rescale", W(f"{Q}.{i}.input_layernorm.weight", (1, D, 1)),
                  W(f"{a}.q_proj.weight", (H * d, D, 1), -1), W(f"{a}.k_proj.weight", (G * d, D, 1), -1),
                  W(f"{a}.v_proj.weight", (G * d, D, 1), -1)),
                S("rescale", W(f"{Q}.{i}.post_attention_layernorm.weight", (1, D, 1)),
                  W(f"{Q}.{i}.mlp.gate_proj.weight", (24, D, 1), -1), W(f"{Q}.{i}.mlp.up_proj.weight", (24, D, 1), -1)),
                S("scale", W(f"{a}.q_proj.weight", (1, H, d * D))),
                S("scale", W(f"{a}.k_proj.weight", (1, G, d * D))),
                S("rescale", W(f"{a}.q_norm.weight", (2, d // 2, 1)), W(f"{a}.k_norm.weight", (2, d // 2, 1), -1)),
            }
        else:
            fams |= {S("scale", W(f"{a}.q_proj.weight", (1, 1, H * d * D))),
                     S("scale", W(f"{a}.k_proj.weight", (1, 1, G * d * D))),
                     S("scale", W(f"{a}.o_proj.weight", (1, 1, D * H * d))),
                     S("scale", W(f"{Q}.{i}.mlp.down_proj.weight", (1, 1, D * 24)))}
            fams |= {S("rescale", W(f"{a}.q_norm.weight", (2 * n, d // 2, 1, g * n * d, d // 2)),
                       W(f"{a}.k_norm.weight", (2, d // 2, 1, g * d, d // 2), -1)) for g in range(G)}
    return fams


@pytest.mark.parametrize("arch", ["Qwen3", "Olmo2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_qk_norm(arch, attn):
    """Qwen3 and OLMo2 (eps → 0: their scale families are exact only in the limit)."""
    # OLMo2's default pad token has a zero embedding row, which its first q_norm reads (no pre-norm) with a
    # variance of 0: exact still, but eps/(var + eps) = 1 there, so the eps rule could not call it exact.
    extra = dict(head_dim=4) if arch == "Qwen3" else dict(pad_token_id=None)
    model = decoder(arch, attn, rms_norm_eps=1e-30, **extra)
    fams, _ = discover(model)
    expected = qk_norm_expected(arch)
    assert len(expected) == (19 if arch == "Qwen3" else 21)
    assert fam_set(fams) == expected
    check_proved(model, fams)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_key_bias_under_padding_masks(attn):
    """With a padding mask (BERT) and a causal plus padding mask (GPT-2) every logit of a query still
    shifts by q·c, masked or not: the same families, the key bias among them; proved and checked on the
    masked batch."""
    mask = torch.ones_like(TOKENS)
    mask[1, -2:] = 0
    model = bert(attn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fams = find_symmetries(model, {"input_ids": TOKENS, "attention_mask": mask, "labels": CLASSES})
    assert fam_set(fams) == bert_expected()
    check_proved(model, fams, mask)
    model = gpt2(False, attn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fams = find_symmetries(model, {**BATCH, "attention_mask": mask})
    assert fam_set(fams) == gpt2_expected(tied=False)
    check_proved(model, fams, mask)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_gemma_scaled_embedding_and_offset_norm(tied):
    """Gemma writes its code differently from Llama: the embedding is multiplied by √D (a constant made
    in the forward), RMSNorm multiplies by (1 + γ) and ends with ``type_as(x)``.  Scaling γ does not scale
    (1 + γ): no norm ↔ readers, no final norm ↔ lm_head.  Per layer Q/K per (kv head, rotation pair) and
    V/O per kv head (2 + 2, :func:`attention_expected`), up ↔ down; the lm_head columns (untied); the
    residual stream's scale (embed_tokens, through the constant factor, o_proj, down_proj): untied
    5 L + 1 + 1 = 12.  Tied, the stream's rescale would need the final norm's affine × 1/α, which (1 + γ)
    cannot give: refused with that reason; 5 L = 10."""
    D, Q = 2 * E, "model.layers"
    model = decoder("Gemma", head_dim=4, tie_word_embeddings=tied)
    fams, rejected = discover(model)
    expected = set()
    writers = [("model.embed_tokens.weight", V * D)]
    for i in range(L):
        expected |= attention_expected(f"{Q}.{i}.self_attn", D, 4, 2, 4, rope=True, bias=False)
        expected.add(S("rescale", W(f"{Q}.{i}.mlp.up_proj.weight", (1, 24, D)),
                       W(f"{Q}.{i}.mlp.down_proj.weight", (D, 24, 1), -1)))
        writers += [(f"{Q}.{i}.self_attn.o_proj.weight", D * D), (f"{Q}.{i}.mlp.down_proj.weight", 24 * D)]
    if not tied:
        expected |= {S("translation", W("lm_head.weight", (V, D, 1))), stream("scale", *writers)}
    assert len(expected) == (10 if tied else 12)
    assert fam_set(fams) == expected
    check_proved(model, fams)
    joint = [r.reason for r in rejected if "(joint)" in r.reason]
    assert joint == ([] if not tied else [
        "model.embed_tokens … model.layers.1.mlp.down_proj (joint): model.embed_tokens.weight is also used by "
        "linear in lm_head, whose input no writer can scale by 1/α"])


def test_llama_tied():
    model = llama(4, "sdpa", tied=True)
    fams, rejected = discover(model)
    assert fam_set(fams) == llama_expected(4, tied=True)
    assert len(fams) == 8 * L + 1
    assert sorted(r.reason.split(":")[0] for r in rejected if "is tied" in r.reason) == [
        "lm_head (translation, columns)", "model.norm → lm_head (rescale)"]


def test_a_callable_loss_still_works():
    """The model's own loss is used when it returns one; a callable (here the same cross-entropy written
    out) gives the same families."""
    model = gpt2(tied=False)

    def loss(out, targets):
        logits = out.logits[:, :-1].flatten(0, 1)
        return torch.nn.functional.cross_entropy(logits, targets[:, 1:].flatten())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fams = find_symmetries(model, {"input_ids": TOKENS}, loss, targets=TOKENS)
    assert fam_set(fams) == gpt2_expected(tied=False)


def test_model_output_without_loss_is_a_clear_error():
    with pytest.raises(TypeError, match="labels"):
        find_symmetries(gpt2(tied=False), {"input_ids": TOKENS})


def test_near_misses_fail_the_finite_check():
    """The independent check has teeth: near-misses of THEORY_TRANSFORMERS.md move the loss."""
    from neural_mechanics_ext import SymmetryFamily
    model = llama(4, "eager")
    D, Q = 2 * E, "model.layers.0"
    misses = [
        SymmetryFamily("rescale", "gate ↔ down", [(f"{Q}.mlp.gate_proj.weight", (1, 24, D), 1),
                                                  (f"{Q}.mlp.down_proj.weight", (D, 24, 1), -1)]),
        SymmetryFamily("rescale", "q ↔ k per dimension", [(f"{Q}.self_attn.q_proj.weight", (1, D, D), 1),
                                                          (f"{Q}.self_attn.k_proj.weight", (1, D, D), -1)]),
    ]
    gqa, A = llama(2, "eager"), f"{Q}.self_attn"
    misses_gqa = [      # 2 kv heads, query heads 0 and 1 read kv head 0 (d = 4, rotation pairs (i, i + 2))
        SymmetryFamily("rescale", "Q/K of one query head", [(f"{A}.q_proj.weight", (2, 2, D, 0, 2 * D), 1),
                                                            (f"{A}.k_proj.weight", (2, 2, D, 0, 2 * D), -1)]),
        SymmetryFamily("rescale", "V/O missing a head", [(f"{A}.v_proj.weight", (1, 4, D, 0, 4 * D), 1),
                                                         (f"{A}.o_proj.weight", (D, 4, 1, 0, D), -1)]),
    ]
    g2 = gpt2(tied=True)
    misses_gpt2 = [
        SymmetryFamily("rescale", "LN γ without β", [("transformer.h.0.ln_1.weight", (1, E, 1), 1),
                                                     ("transformer.h.0.attn.c_attn.weight", (1, E, 3 * E), -1)]),
        SymmetryFamily("translation", "tied lm_head columns", [("lm_head.weight", (V, E, 1), 1)]),
    ]
    # The residual stream's near-misses, checked as eps → 0 (where the true stream family is exact): one
    # writer missing; the scale group of a tied model (the lm_head scales the logits); the final norm
    # per channel against the tied lm_head's columns.
    stream_fam = next(f for f in llama_expected(4, tied=False) if f[0] == "scale")
    no_down = sorted(m for m in stream_fam[1] if m[0] != "model.layers.1.mlp.down_proj.weight")
    tied = llama(4, "eager", tied=True)
    tied_scale = sorted(m for m in next(f for f in llama_expected(4, tied=True) if W("model.norm.weight", (1, 1, D), -1) in f[1])[1] if m[2] > 0)
    misses_stream = [SymmetryFamily("scale", "stream without down_proj", no_down, extra={"approx": []})]
    misses_tied = [SymmetryFamily("scale", "stream scale, tied", tied_scale, extra={"approx": []}),
                   SymmetryFamily("rescale", "final norm ↔ tied lm_head", [("model.norm.weight", (1, D, 1), 1),
                                                                          ("lm_head.weight", (V, D, 1), -1)])]
    for m, fams in ((model, misses + misses_stream), (gqa, misses_gqa), (g2, misses_gpt2), (tied, misses_tied)):
        for f in fams:
            with pytest.raises(AssertionError):
                check_finite_transformation(m, f)


def test_bias_and_qk_norm_near_misses_fail_the_finite_check():
    """What discovery must not find moves the loss: a key bias under RoPE (q·R_t c depends on the key's
    position), query and value bias shifts, the Q/K rescale of the projections' rows under QK-norm, q_norm
    ↔ k_norm per dimension instead of per rotation pair, Qwen3's per-head q_proj scale where OLMo2 norms
    the whole projection."""
    from neural_mechanics_ext import SymmetryFamily as F_
    D, A, d = 2 * E, "model.layers.0.self_attn", 4
    b, g2 = "bert.encoder.layer.0.attention.self", "transformer.h.0.attn.c_attn.bias"
    qk_rows = next(f for f in attention_expected(A, D, 4, 2, d, rope=True, bias=False)
                   if any(n.endswith("q_proj.weight") for n, _, _ in f[1]))[1]
    cases = [
        (decoder("Qwen2"), [F_("translation", "k bias under RoPE", [(f"{A}.k_proj.bias", (1, 8, 1), 1)])]),
        (bert("eager"), [F_("translation", "query bias", [(f"{b}.query.bias", (1, E, 1), 1)]),
                         F_("translation", "value bias", [(f"{b}.value.bias", (1, E, 1), 1)])]),
        (gpt2(tied=False), [F_("translation", "query bias", [(g2, (1, E, 1, 0, E), 1)]),
                            F_("translation", "value bias", [(g2, (1, E, 1, 2 * E, E), 1)])]),
        (decoder("Qwen3", head_dim=4, rms_norm_eps=1e-30),
         [F_("rescale", "Q/K rows under QK-norm", list(qk_rows)),
          F_("rescale", "q_norm ↔ k_norm per dim", [(f"{A}.q_norm.weight", (1, d, 1), 1),
                                                    (f"{A}.k_norm.weight", (1, d, 1), -1)])]),
        (decoder("Olmo2", rms_norm_eps=1e-30, pad_token_id=None),
         [F_("scale", "q_proj per head", [(f"{A}.q_proj.weight", (1, 4, d * D), 1)])]),
    ]
    for model, fams in cases:
        for f in fams:
            with pytest.raises(AssertionError):
                check_finite_transformation(model, f)


# ---------------------------------------------------------------------- BERT, ViT (post-LN; fused/packed q/k/v)
def bert(attn):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=E, num_hidden_layers=L, num_attention_heads=2,
                                  intermediate_size=12, max_position_embeddings=8, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=3, attn_implementation=attn)
    return perturb(transformers.BertForSequenceClassification(cfg).double().train())


def bert_expected():
    """Post-LN BERT, E = 8, 2 heads, intermediate 12, 3 labels.
    * embeddings: word, position and token-type rows (translation: the embedding LayerNorm removes a shift
      uniform over the channels of a position), one family each;
    * per layer: Q/K, query row j + bias ↔ key row j + bias (no RoPE: one family of whole views); V/O,
      value row j + bias ↔ attention.output.dense column j; attention.output.dense and output.dense input
      columns and bias (translation: they write the stream just before a LayerNorm); the key bias
      (translation, one group per element: the softmax over keys absorbs q·c);
    * the last layer's output LayerNorm (γ, β) ↔ pooler.dense column j (only the pooler reads it);
    * classifier columns and bias (cross-entropy).
    * joint: the three embedding tables together (scale: the embedding LayerNorm absorbs them); per layer,
      one rescale per sublayer: the LayerNorm before it (γ, β) and its output dense (W, b) × α against its
      input weights (q, k, v; the intermediate dense) × 1/α, the sublayer's LayerNorm absorbing the sum.
    Not per-channel LN ↔ q, k, v (a post-LN output also feeds the residual); not the query or value bias
    shifted.  3 + 7 L + 1 + 2 + 1 + 2 L = 25 families."""
    e, lay = "bert.embeddings", "bert.encoder.layer"
    fams = {S("translation", W(f"{e}.word_embeddings.weight", (1, V, E))),
            S("translation", W(f"{e}.position_embeddings.weight", (1, 8, E))),
            S("translation", W(f"{e}.token_type_embeddings.weight", (1, 2, E))),
            S("rescale", W(f"{lay}.{L - 1}.output.LayerNorm.weight", (1, E, 1)),
              W(f"{lay}.{L - 1}.output.LayerNorm.bias", (1, E, 1)), W("bert.pooler.dense.weight", (E, E, 1), -1)),
            S("translation", W("classifier.weight", (3, E, 1))), S("translation", W("classifier.bias", (1, 1, 3))),
            stream("scale", (f"{e}.word_embeddings.weight", V * E), (f"{e}.position_embeddings.weight", 8 * E),
                   (f"{e}.token_type_embeddings.weight", 2 * E))}
    for i in range(L):
        a = f"{lay}.{i}.attention"
        before = f"{e}.LayerNorm" if i == 0 else f"{lay}.{i - 1}.output.LayerNorm"
        fams |= {
            S("rescale", W(f"{before}.weight", (1, 1, E)), W(f"{before}.bias", (1, 1, E)),
              W(f"{a}.output.dense.weight", (1, 1, E * E)), W(f"{a}.output.dense.bias", (1, 1, E)),
              *[W(f"{a}.self.{x}.weight", (1, 1, E * E), -1) for x in ("query", "key", "value")]),
            S("rescale", W(f"{a}.output.LayerNorm.weight", (1, 1, E)), W(f"{a}.output.LayerNorm.bias", (1, 1, E)),
              W(f"{lay}.{i}.output.dense.weight", (1, 1, 12 * E)), W(f"{lay}.{i}.output.dense.bias", (1, 1, E)),
              W(f"{lay}.{i}.intermediate.dense.weight", (1, 1, 12 * E), -1)),
            S("rescale", W(f"{a}.self.query.weight", (1, E, E)), W(f"{a}.self.query.bias", (1, E, 1)),
              W(f"{a}.self.key.weight", (1, E, E), -1), W(f"{a}.self.key.bias", (1, E, 1), -1)),
            S("rescale", W(f"{a}.self.value.weight", (1, E, E)), W(f"{a}.self.value.bias", (1, E, 1)),
              W(f"{a}.output.dense.weight", (E, E, 1), -1)),
            S("translation", W(f"{a}.output.dense.weight", (E, E, 1))),
            S("translation", W(f"{a}.output.dense.bias", (1, 1, E))),
            S("translation", W(f"{lay}.{i}.output.dense.weight", (E, 12, 1))),
            S("translation", W(f"{lay}.{i}.output.dense.bias", (1, 1, E))),
            S("translation", W(f"{a}.self.key.bias", (1, E, 1))),
        }
    return fams


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bert(attn):
    model = bert(attn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fams = find_symmetries(model, {"input_ids": TOKENS, "labels": CLASSES})
    expected = bert_expected()
    assert len(expected) == 25
    assert fam_set(fams) == expected
    check_proved(model, fams)


def vit_expected(prefix, ln, attn, mlp, head, patch, pos, packed, cls):
    """A pre-LN ViT on 8×8 images, patches 4×4 (5 tokens with the class token), E = 8, 2 heads, MLP 12,
    3 classes.  Per block: ln_1 (γ, β) ↔ the q/k/v weight's input columns (rescale); Q/K: query row j (+
    bias) ↔ key row E + j of the fused [3E, E] weight — views (1, E, E, 0, E·E) and (1, E, E, E·E, E·E),
    bias (1, E, 1, 0, E) and (1, E, 1, E, E); V/O: value rows 2E + j (+ bias) ↔ out-projection column j;
    ln_2 ↔ the first MLP layer; the second MLP layer's columns and bias (translation, before a LayerNorm);
    the key bias, elements E + j of the fused bias (translation, one group per element, view (1, E, 1, E, E));
    the out-projection's columns and bias too (timm's attn.proj; torchvision's out_proj, inside
    ``multi_head_attention_forward``: the call ends with it).  Plus the patch projection's columns and bias (translation), the position
    table's rows (translation), the class token (translation: concatenated at position 0, where every
    LayerNorm removes a shift uniform over channels), the final LN ↔ head columns, the head's columns and
    bias.  The residual stream (joint scale group): patch projection (W, b), class token, position table,
    every out-projection and second MLP layer (W, b) × α; only LayerNorms read the stream.
    3 + 9 L + 3 + 2 = 26 for both."""
    qkv_w, qkv_b, out_w = packed
    fams = {S("translation", W(f"{patch}.weight", (E, 48, 1))), S("translation", W(f"{patch}.bias", (1, 1, E))),
            S("translation", W(pos, (1, 5, E))),
            S("rescale", W(f"{head[0]}.weight", (1, E, 1)), W(f"{head[0]}.bias", (1, E, 1)),
              W(f"{head[1]}.weight", (3, E, 1), -1)),
            S("translation", W(f"{head[1]}.weight", (3, E, 1))), S("translation", W(f"{head[1]}.bias", (1, 1, 3))),
            S("translation", W(cls, (1, 1, E)))}
    writers = [(f"{patch}.weight", E * 48), (f"{patch}.bias", E), (cls, E), (pos, 5 * E)]
    for i in range(L):
        o = f"{prefix}{i}.{packed[2]}"
        writers += [(o, E * E), (o.replace(".weight", ".bias"), E), (f"{prefix}{i}.{mlp[1]}.weight", 12 * E),
                    (f"{prefix}{i}.{mlp[1]}.bias", E)]
    fams.add(stream("scale", *writers))
    for i in range(L):
        b = f"{prefix}{i}"
        w, bb, o = f"{b}.{qkv_w}", f"{b}.{qkv_b}", f"{b}.{out_w}"
        fams |= {
            S("rescale", W(f"{b}.{ln[0]}.weight", (1, E, 1)), W(f"{b}.{ln[0]}.bias", (1, E, 1)), W(w, (3 * E, E, 1), -1)),
            S("rescale", W(f"{b}.{ln[1]}.weight", (1, E, 1)), W(f"{b}.{ln[1]}.bias", (1, E, 1)),
              W(f"{b}.{mlp[0]}.weight", (12, E, 1), -1)),
            S("rescale", W(w, (1, E, E, 0, E * E)), W(bb, (1, E, 1, 0, E)),
              W(w, (1, E, E, E * E, E * E), -1), W(bb, (1, E, 1, E, E), -1)),
            S("rescale", W(w, (1, E, E, 2 * E * E, E * E)), W(bb, (1, E, 1, 2 * E, E)), W(o, (E, E, 1), -1)),
            S("translation", W(f"{b}.{mlp[1]}.weight", (E, 12, 1))), S("translation", W(f"{b}.{mlp[1]}.bias", (1, 1, E))),
            S("translation", W(bb, (1, E, 1, E, E))),
        }
        if attn:
            fams |= {S("translation", W(f"{b}.{attn}.weight", (E, E, 1))),
                     S("translation", W(f"{b}.{attn}.bias", (1, 1, E)))}
    return fams


def test_torchvision_vit():
    """``nn.MultiheadAttention`` (packed in_proj_weight, one ``multi_head_attention_forward`` call)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = perturb(torchvision.models.VisionTransformer(image_size=8, patch_size=4, num_layers=L, num_heads=2,
                                                         hidden_dim=E, mlp_dim=12, num_classes=3).double().train())
    torch.nn.init.normal_(model.heads.head.weight)    # torchvision starts it at 0: every other gradient would be 0
    fams = find_symmetries(model, IMAGES, targets=CLASSES)
    sa = "self_attention"
    expected = vit_expected("encoder.layers.encoder_layer_", ("ln_1", "ln_2"), "self_attention.out_proj", ("mlp.0", "mlp.3"),
                            ("encoder.ln", "heads.head"), "conv_proj", "encoder.pos_embedding",
                            (f"{sa}.in_proj_weight", f"{sa}.in_proj_bias", f"{sa}.out_proj.weight"), "class_token")
    assert len(expected) == 26
    assert fam_set(fams) == expected
    check_proved(model, fams)


def test_timm_vit():
    """timm: one fused ``qkv`` Linear, then ``scaled_dot_product_attention``."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = perturb(timm.models.vision_transformer.VisionTransformer(
        img_size=8, patch_size=4, embed_dim=E, depth=L, num_heads=2, mlp_ratio=1.5, num_classes=3).double().train())
    fams = find_symmetries(model, IMAGES, targets=CLASSES)
    expected = vit_expected("blocks.", ("norm1", "norm2"), "attn.proj", ("mlp.fc1", "mlp.fc2"), ("norm", "head"),
                            "patch_embed.proj", "pos_embed", ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight"),
                            "cls_token")
    assert len(expected) == 26
    assert fam_set(fams) == expected
    check_proved(model, fams)


def test_timm_vit_with_qk_norm():
    """timm's ``qk_norm=True``: a LayerNorm over each head's query and key (no RoPE; eps set to 1e-30).  Against
    plain timm (:func:`vit_expected`): the Q/K rescale of the qkv rows and the key part of qkv's bias are gone
    (the norm divides by its whole head); instead the qkv rows and bias of each query head and each key head
    form a scale group (4 groups: rows 4h … 4h + 3 for the 2 query and then the 2 key heads, one family —
    the fused projection's value rows are V/O), q_norm (γ_i, β_i) ↔ k_norm (γ_i, β_i) per dim i (rescale),
    and k_norm's β, now the key bias, per element (translation).  3 + 10 L + 3 + 2 = 28."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = perturb(timm.models.vision_transformer.VisionTransformer(
        img_size=8, patch_size=4, embed_dim=E, depth=L, num_heads=2, mlp_ratio=1.5, num_classes=3,
        qk_norm=True).double().train())
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-30
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # q_norm / k_norm normalise 4 values per set: advisory warning
        fams = find_symmetries(model, IMAGES, targets=CLASSES)
    expected = vit_expected("blocks.", ("norm1", "norm2"), "attn.proj", ("mlp.fc1", "mlp.fc2"), ("norm", "head"),
                            "patch_embed.proj", "pos_embed", ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight"),
                            "cls_token")
    d = E // 2
    for i in range(L):
        a = f"blocks.{i}.attn"
        w, bb, qn, kn = f"{a}.qkv.weight", f"{a}.qkv.bias", f"{a}.q_norm", f"{a}.k_norm"
        expected -= {S("rescale", W(w, (1, E, E, 0, E * E)), W(bb, (1, E, 1, 0, E)),
                       W(w, (1, E, E, E * E, E * E), -1), W(bb, (1, E, 1, E, E), -1)),
                     S("translation", W(bb, (1, E, 1, E, E)))}
        expected |= {S("scale", W(w, (1, 4, d * E, 0, 4 * d * E)), W(bb, (1, 4, d, 0, 4 * d))),
                     S("rescale", W(f"{qn}.weight", (1, d, 1)), W(f"{qn}.bias", (1, d, 1)),
                       W(f"{kn}.weight", (1, d, 1), -1), W(f"{kn}.bias", (1, d, 1), -1)),
                     S("translation", W(f"{kn}.bias", (1, d, 1)))}
    assert len(expected) == 28
    assert fam_set(fams) == expected
    check_proved(model, fams)
