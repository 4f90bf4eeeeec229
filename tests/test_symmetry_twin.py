"""Discovery on a reduced-depth twin (``find_symmetries(twin_layers=3)``, symmetry/twin.py) on Hugging Face
models built from configs (no download): the families mapped from the twin to every layer are exactly those
of the full path (names, members, views, kinds, order, refusals), in float64 and with the check on the model
in float32 and bfloat16; models whose layers differ are refused with the reason.

Expected counts (derived in tests/test_symmetry_transformers.py, per layer and for the head), for L = 5:
Llama with grouped-query attention (2 kv heads): 7 L + 2 = 37 families (norm ↔ q/k/v columns, norm ↔
gate/up columns, up rows ↔ down columns, Q/K and V/O per kv head; final norm ↔ lm_head, lm_head columns);
GPT-2: 9 L + 4 = 49 untied (per layer ln_1/ln_2 ↔ readers, Q/K, V/O, the key bias, the writers' rows and
biases; wpe, wte, ln_f ↔ lm_head, lm_head columns), 9 L + 1 = 46 tied.  Qwen2 (per-layer
``config.layer_types``, q/k/v biases; the k_proj bias is no translation under RoPE): as Llama, 7 L + 2 = 37.
BERT (post-LN, ``encoder.layer``): per layer Q/K, V ↔ O, the key bias and the columns and bias of the two
writers of the residual (attention output, FFN output) as translations, 7 L; word/position/token-type rows;
the LAST layer's output LayerNorm ↔ pooler columns (a family of the last layer only: twin layer 2 maps to
full layer 4 alone); classifier columns and bias: 7 L + 6 = 41.  Plus the joint families: the residual
stream of Llama, Qwen2 and GPT-2 (+1; a rescale against the final norm when tied), the whole tied wte of
GPT-2 (+1), BERT's embedding tables (+1) and sublayer rescales (+2 L, of which the L − 1 attention ones join
two neighbouring layers and are refused on the twin).
"""
from __future__ import annotations

import re
import types
import warnings

import pytest
import torch

from neural_mechanics_ext import SymmetryFamily, find_symmetries
from neural_mechanics_ext.symmetry import twin as twin_module
from neural_mechanics_ext.symmetry.prove import Rejected, rounding_tolerance
from neural_mechanics_ext.symmetry.twin import Twin, TwinError

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

V, L = 13, 5
TOKENS = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(0))
BATCH = {"input_ids": TOKENS, "labels": TOKENS}


def llama(kv_heads=2, tied=False, layers=L):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=16,
                                   tie_word_embeddings=tied, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).double().train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(torch.rand_like(p) + 0.5)
    return model


def gpt2(tied):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=8, n_embd=8, n_layer=L, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tied)
    model = transformers.GPT2LMHeadModel(cfg).double().train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ln_" in n:
                p.copy_(torch.rand_like(p) + 0.5 if n.endswith("weight") else torch.randn_like(p) * 0.1)
    return model


def qwen2():
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=L,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    assert cfg.layer_types == ["full_attention"] * L
    return transformers.Qwen2ForCausalLM(cfg).double().train()


def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=L, num_attention_heads=4,
                                  intermediate_size=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).double().train()


def discover(model, twin_layers):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = {"input_ids": TOKENS, "labels": torch.tensor([0, 2])} if "Bert" in type(model).__name__ else BATCH
        return find_symmetries(model, batch, return_rejected=True, twin_layers=twin_layers)


def sig(families):
    """What the twin path must reproduce; the eps/(var + eps) in an approximate family's note is the twin's
    measurement (each middle layer takes its role's), so only its wording is compared."""
    return [(f.name, f.kind, f.members, f.layer, f.note and re.sub(r"\d\.\de-\d+", "#", f.note)) for f in families]


# Counts as derived in tests/test_symmetry_transformers.py: Llama per layer 3 + G (Q/K per kv head) + V/O (1
# without GQA, G with it), + 2 untied (final norm ↔ lm_head, lm_head columns); GPT-2 1 + 9 L (+ 3 untied);
# BERT 3 + 7 L + 1 + 2 (both with one key-bias translation per layer; Qwen2's k_proj bias is not one: RoPE).
# Joint: the residual stream (+1), the whole tied wte of GPT-2 (+1); BERT's are the embedding tables (+1) and
# one rescale per sublayer (+2 L), but a sublayer rescale joins the LayerNorm of the layer before it: on the
# twin it couples neighbouring layers and is refused (use twin_layers=None).
@pytest.mark.parametrize("build, count", [(lambda: llama(2), 7 * L + 3), (lambda: llama(4, tied=True), 8 * L + 1),
                                          (lambda: gpt2(False), 9 * L + 5), (lambda: gpt2(True), 9 * L + 3),
                                          (qwen2, 7 * L + 3), (bert, 7 * L + 6 + 1 + 2 * L)],
                         ids=["llama-gqa", "llama-mha-tied", "gpt2", "gpt2-tied", "qwen2", "bert"])
def test_twin_gives_the_families_of_the_full_path(build, count):
    model = build()
    full, full_rej = discover(model, None)
    twin, twin_rej = discover(model, 3)
    assert len(full) == count
    coupled = [f for f in full if len({int(m) for m in re.findall(r"layer\.(\d+)\.", " ".join(
        n for n, _, _ in f.members))}) == 2]
    if coupled:     # BERT: the attention-sublayer rescales of layers 1 .. L-1 join the layer before
        assert len(coupled) == L - 1 and all("joint" in f.name for f in coupled)
        full = [f for f in full if f not in coupled]
        refused = [r for r in twin_rej if "coupling of neighbouring layers" in r.reason]
        assert len(refused) == 2        # twin layers (0, 1) and (1, 2)
        twin_rej = [r for r in twin_rej if r not in refused]
    assert sig(twin) == sig(full)
    assert [r.reason for r in twin_rej] == [r.reason for r in full_rej]
    for f in twin:       # proved on the float64 twin, then again on the model itself (float64 here)
        assert f.residual <= f.tolerance, f.name
        if "approx" in f.extra:     # the residual stream's scale: exact as eps → 0, approximate at the eps
            assert "joint" in f.name and f.extra["residual_eps_limit"] <= 1e-8, f.name
        else:
            assert f.tolerance == 1e-8 and f.extra["twin_residual"] <= 1e-8, f.name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_check_on_the_model_runs_in_its_own_dtype(dtype):
    reference, _ = discover(llama(2), None)
    model = llama(2).to(dtype)
    fams, rejected = discover(model, 3)
    assert sig(fams) == sig(reference)
    tol = rounding_tolerance(dtype)
    assert tol == 4 * torch.finfo(dtype).eps / 2
    assert all(f.residual <= f.tolerance and (f.tolerance == tol or "approx" in f.extra) for f in fams)
    assert all(r.residual is None for r in rejected)     # only the V/O refusals, none by the check
    assert all(p.dtype == dtype and p.grad is None for p in model.parameters())   # the model is untouched


def test_a_forward_patched_on_one_layer_is_caught_by_the_check_on_the_model():
    """Structure identical, code not: layer 2's MLP computes down(silu(up) * gate), so up ↔ down no longer
    holds there (up sits inside the SiLU).  The twin cannot see it; the proof on the model refuses it."""
    model = llama(2)
    mlp = model.model.layers[2].mlp
    mlp.forward = types.MethodType(lambda self, x: self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x)),
                                   mlp)
    fams, rejected = discover(model, 3)
    name = "model.layers.2.mlp.up_proj → model.layers.2.mlp.down_proj (rescale)"
    assert name not in {f.name for f in fams} and len(fams) == 7 * L + 2
    (r,) = [r for r in rejected if r.family is not None and r.family.name == name]
    assert "gradient check failed" in r.reason and r.residual > 1e-4     # measured 8e-4


def test_layers_that_differ_are_refused_with_the_reason():
    model = llama(2)
    cfg = transformers.LlamaConfig(**{**model.config.to_dict(), "intermediate_size": 32})
    model.model.layers[3].mlp = transformers.models.llama.modeling_llama.LlamaMLP(cfg).double()
    with pytest.raises(TwinError, match=r"layers differ: model\.layers\.3 .*gate_proj\.weight: \(\(32, 16\)"):
        Twin(model, 3)
    with pytest.raises(TwinError, match="layers differ"):
        discover(model, 3)
    model = llama(2)
    model.model.layers[2].mlp.act_fn = torch.nn.GELU()
    with pytest.raises(TwinError, match=r"model\.layers\.2 .*act_fn: \('GELU'"):
        Twin(model, 3)
    model = llama(2)
    model.model.layers[4].input_layernorm.weight.requires_grad_(False)     # the last layer, a kept one
    Twin(model, 3)                                                          # copied into the twin: fine
    model.model.layers[3].input_layernorm.weight.requires_grad_(False)     # a middle layer: differs
    with pytest.raises(TwinError, match="model.layers.3 is not like model.layers.1"):
        Twin(model, 3)


def test_models_that_cannot_have_a_twin():
    with pytest.raises(TwinError, match="config.num_hidden_layers"):
        Twin(torch.nn.Sequential(torch.nn.Linear(3, 3)), 3)
    shallow = llama(2, layers=3)
    with pytest.raises(TwinError, match="not more than twin_layers=3"):
        Twin(shallow, 3)
    assert sig(discover(shallow, 3)[0]) == sig(discover(shallow, None)[0])    # no deeper than a twin: whole model
    with pytest.raises(ValueError, match="twin_layers must be an int >= 3"):
        Twin(llama(2), 2)
    model = llama(2)
    model.config = transformers.LlamaConfig(**{**model.config.to_dict(), "hidden_size": 32})
    with pytest.raises(TwinError, match="not what its config builds"):
        Twin(model, 3)


def test_auto_uses_a_twin_above_the_threshold(monkeypatch):
    model = llama(2)
    reference, _ = discover(model, None)
    monkeypatch.setattr(twin_module, "TWIN_AUTO_PARAMS", 1000)
    with pytest.warns(RuntimeWarning, match="3-layer twin"):
        fams = find_symmetries(model, BATCH)
    assert sig(fams) == sig(reference)
    with pytest.warns(RuntimeWarning, match="Using the whole model"):
        find_symmetries(llama(2, layers=3), BATCH)


def test_mapping_of_families_joining_several_layers():
    """A family joining every twin layer joins every full layer (each layer its role's members); one joining
    some twin layers, or a middle layer and a parameter outside the layers, cannot be mapped."""
    model = llama(2)
    twin = Twin(model, 3)
    assert [twin.role(i) for i in range(L)] == [0, 1, 1, 1, 2]
    down = "model.layers.{}.mlp.down_proj.weight"
    stream = SymmetryFamily("scale", "stream", [("model.embed_tokens.weight", (1, 1, V * 16), 1)] +
                            [(down.format(j), (1, 1, 16 * 24), 1) for j in range(3)])
    (mapped,) = twin.map_family(stream)
    assert [m[0] for m in mapped.members] == ["model.embed_tokens.weight"] + [down.format(i) for i in range(L)]
    pair = SymmetryFamily("scale", "pair", [(down.format(j), (1, 1, 16 * 24), 1) for j in (0, 1)])
    assert isinstance(twin.map_family(pair), Rejected) and "joins layers [0, 1]" in twin.map_family(pair).reason
    mixed = SymmetryFamily("scale", "mixed", [("model.norm.weight", (1, 1, 16), 1), (down.format(1), (1, 1, 384), 1)])
    assert "middle layer" in twin.map_family(mixed).reason
    last = SymmetryFamily("scale", "last", [("model.norm.weight", (1, 1, 16), 1), (down.format(2), (1, 1, 384), 1)])
    assert [m[0] for m in twin.map_family(last)[0].members] == ["model.norm.weight", down.format(L - 1)]
