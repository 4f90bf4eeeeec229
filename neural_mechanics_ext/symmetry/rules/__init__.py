"""Symmetry rules (THEORY.md §1.2) as perturbation propagation over the captured graph.

Every candidate starts at one *source*: a call with parameters whose slices act on one axis of its
output.  Scaling output channel ``k`` of a Linear/Conv (``W[k], b[k]``) or of a normaliser's affine
(``γ_k, β_k``) multiplies that channel by ``α``; shifting the bias ``b[k]`` adds ``α`` to it; shifting
column ``j`` of a Linear weight adds ``α·x_j`` to *every* output feature.  The perturbation is then
followed forward, op by op, on *label tensors* (same shape as the activation; each element holds the
group that perturbs it, ``-1`` for none), until every path has ended in one of:

* an **absorber**, which makes the loss blind to it: a normaliser in training mode for a scaling
  (BatchNorm, InstanceNorm, GroupNorm, LayerNorm, RMSNorm, ``F.normalize``); a normaliser, softmax,
  log-softmax or cross-entropy for a shift that is uniform over the set it normalises;
* a **compensator** (scalings only): a Linear/Conv/matmul/attention input projection that reads the
  scaled channel; its slice for that channel is the outgoing side ``A2`` of a rescale group.

Anything else (a non-homogeneous activation, a residual join, the loss itself, an unknown op) ends the
candidate.  Data movement (view, flatten, permute, indexing, cat, padding) is replayed on the label
tensors, so flatten blocks, head splits and channel concatenations are followed exactly rather than
pattern-matched.  Where an op needs several groups to move together (a GroupNorm or LayerNorm that
normalises many channels at once, a reduction over channels) the groups are merged (union-find), which
is how "one scale group per channel group" or "the whole layer" falls out.

The result is a candidate family: kind ``scale`` (only absorbers), ``rescale`` (compensators) or
``translation`` (shifts), whose members are obtained by writing, for every parameter involved, the
group of each of its elements and fitting views to that map: one ``(A, K, B)`` view of each whole tensor
when it exists, else the groups split into families whose members are ``(A, K, B, offset, a_stride)``
views of parts of tensors (a grouped conv consumer, a permuted consumer, the Q and K blocks of a fused
projection, the o_proj columns of every query head sharing a kv head; :mod:`.fit`).

Attention: a query scaled by α meets a key scaled by 1/α in ``q·k``.  Each label has a parity in the
union-find (odd: scaled by 1/α of its group), the product joins each query index with the key index it
meets with odd parity (:func:`.attention.pair_inverse`), and an odd label's parameter elements get the
opposite sign.  Separate projections start together (:mod:`.query_key`); a single call that compensates
inside (``multi_head_attention_forward``) gives its own Q/K and V/O sources.  A key shifted alike at every
position (a key bias) shifts each query's logits by one value ``q·c`` over all keys, which the softmax
absorbs; that value mixes the shifts of every element of ``c``, which stay separate groups (a *mixture*
label, :meth:`.state.UnionFind.mixture`).

Joint candidates (:mod:`.joint`): where a layer's own scaling dies at a residual join, the writers of the
other term join it (one group), and so on until the scaling survives — the residual stream's scale of a
pre-norm transformer, BERT's post-LN sublayer rescales; a tied parameter is accepted when every one of its
uses is accounted for (the stream against the final norm when the embedding is the lm_head; a tied
embedding shifted as a whole).

Choices (all follow from starting with the finest groups and merging only what an op forces):

* Translation of a bias starts with one group per element.  In front of BatchNorm / InstanceNorm every
  ``b[k]`` stays its own group (view ``(1, C, 1)``): each has zero gradient by itself, and the whole-bias
  group is just their sum.  GroupNorm merges the biases of a channel group, LayerNorm and
  cross-entropy merge all of them (view ``(1, 1, C)``).  Weight columns are a separate family
  ("columns", one group per input position); both are named ``"<layer> (translation, bias|columns)"``.
* Scale of a Linear/Conv is ``{W[k], b[k]}`` per output channel (``W`` rows ``(1, out, rest)``, ``b``
  ``(1, out, 1)``), merged to channel groups by GroupNorm and to the whole layer by LayerNorm.
* A shift passes through additions of unperturbed tensors (a shift of the residual stream stays a
  shift), a scaling does not (a residual join ends it).
* A unit read by several layers is compensated in all of them (all join ``A2``); a unit that is also
  read by anything else is not a symmetry.

Layout: :mod:`.state` (label tensors and the helpers every handler shares), one module per op family
(:mod:`.elementwise`, :mod:`.movement`, :mod:`.reductions`, :mod:`.linear`, :mod:`.attention`,
:mod:`.normalisers`, :mod:`.softmax_losses`, :mod:`.query_key`), :mod:`.registry` (op name → handler),
:mod:`.engine` (sources and propagation over a graph), :mod:`.joint` (joint and tied candidates),
:mod:`.candidate` (kind, name and member views of a candidate), :mod:`.fit` (views fitted to group maps).
"""
from __future__ import annotations

from .candidate import Candidate, build_candidate, fit_view
from .engine import find_sources, propagate
from .joint import joint_sources, tied_shifts
from .state import Source, layer_name

__all__ = ["Candidate", "Source", "build_candidate", "find_sources", "fit_view", "joint_sources", "layer_name",
           "propagate", "tied_shifts"]
