"""Stateless Group Loss functions.

Every function takes and returns ``torch.Tensor`` objects; the work is done
in Rust over libtorch with the GIL released, and autograd flows through it
like through any PyTorch op. Results keep the inputs' device; float64 stays
float64, half and bfloat16 inputs (e.g. under ``torch.autocast``) are computed
in float32.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
from typing import Any, NamedTuple, Optional

import torch
from torch.autograd import forward_ad

from . import _native
from ._args import SEED_MAX, boolean, integer, number
from ._deprecation import renamed_keywords

__all__ = [
    "GroupLossOptions",
    "GroupLossOutput",
    "anchor_mask",
    "group_loss",
    "refine",
    "similarity",
]

_HALF = (torch.float16, torch.bfloat16)


class GroupLossOutput(NamedTuple):
    """The parts of one Group Loss evaluation.

    Attributes:
        loss: ``gtg_weight * nll + ce_weight * ce``, a 0-d tensor.
        nll: NLL of the refined probabilities, or None when ``gtg_weight == 0``.
        ce: cross-entropy of the raw logits, or None when ``ce_weight == 0``.
        probs: refined probabilities X (batch x classes), or None when
            ``gtg_weight == 0``. With ``batch_classes_only`` its columns are
            the classes in ``classes``.
        classes: with ``batch_classes_only``, the sorted classes present in the
            batch; else None.
    """

    loss: torch.Tensor
    nll: Optional[torch.Tensor]
    ce: Optional[torch.Tensor]
    probs: Optional[torch.Tensor]
    classes: Optional[torch.Tensor]


# Whether the backward running now keeps its graph (``retain_graph``); where
# torch has no such query, it is taken as kept.
_graph_kept = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", lambda: True)


def _seeded(grad_loss, g_emb, g_logits):
    """The closed-form gradients times the backward seed. The usual
    ``loss.backward()`` seeds 1: hand them over as they are instead of
    scaling a copy (a CUDA seed is not read: no sync), unless the graph is
    kept: the saved tensors then serve the next backward too, and must not
    be what the caller receives (and may change in place)."""
    if grad_loss.is_cpu and grad_loss.item() == 1.0:
        if _graph_kept():
            return g_emb.clone(), g_logits.clone()
        return g_emb, g_logits
    return g_emb * grad_loss, g_logits * grad_loss


def _save(ctx, r, embeddings, logits, labels, call) -> None:
    """Saves the closed-form gradients, and the inputs from which
    :func:`_differentiable_grads` recomputes them (as PyTorch's own losses
    save theirs: changing one in place before backward is an error)."""
    ctx.save_for_backward(r.grad_embeddings, r.grad_logits, embeddings, logits, labels)
    ctx.call = call


def _backward(ctx, grad_loss):
    """The inputs' gradients of a closed-form node: the saved ones, or under
    ``create_graph`` (grad mode on in backward) gradients that can be
    differentiated again."""
    g_emb, g_logits, embeddings, logits, labels = ctx.saved_tensors
    if not torch.is_grad_enabled():  # the usual backward
        return (*_seeded(grad_loss, g_emb, g_logits), None, None)
    grads = _differentiable_grads(embeddings, logits, labels, ctx.call, grad_loss)
    return (*grads, None, None)


def _differentiable_grads(embeddings, logits, labels, call, grad_loss):
    """The gradients of the loss as functions of the inputs, for a backward
    that builds a graph (``create_graph=True``: gradient penalties,
    Hessians): the loss recomputed by the ``"autograd"`` implementation (the
    same values) and differentiated with ``create_graph``. The closed forms'
    gradients, constants of the inputs, would differentiate to 0 there."""
    wanted = [t for t in (embeddings, logits) if t.requires_grad]
    with torch.enable_grad():
        loss = _native.group_loss(
            embeddings, labels, logits, want_grads=False, **{**call, "implementation": "autograd"}
        ).loss
        found = iter(torch.autograd.grad(loss, wanted, grad_loss, create_graph=True))
    return tuple(next(found) if t.requires_grad else None for t in (embeddings, logits))


class _GroupLoss(torch.autograd.Function):
    """Autograd node of the closed-form implementation: the Rust core returns
    the loss and, in the same call, its gradients; backward scales them.

    The loss alone, the common case, kept lean: a call of this node and its
    backward cost about as much Python as the products of a CUB batch.
    """

    @staticmethod
    def forward(ctx, embeddings, logits, labels, call):
        r = _native.group_loss(embeddings, labels, logits, want_grads=True, **call)
        # Saved, not kept on ctx: autograd releases saved tensors right after
        # backward (unless retain_graph), so that the gradients handed over
        # become the leaves' .grad without a copy.
        _save(ctx, r, embeddings, logits, labels, call)
        return r.loss

    @staticmethod
    def backward(ctx, grad_loss):
        return _backward(ctx, grad_loss)


class _GroupLossDetails(torch.autograd.Function):
    """:class:`_GroupLoss` that also returns the loss's parts
    (``return_details``)."""

    @staticmethod
    def forward(ctx, embeddings, logits, labels, call):
        r = _native.group_loss(embeddings, labels, logits, want_grads=True, want_probs=True, **call)
        _save(ctx, r, embeddings, logits, labels, call)
        extras = [t for t in (r.nll, r.ce, r.probs, r.classes) if t is not None]
        if extras:
            ctx.mark_non_differentiable(*extras)
        return r.loss, r.nll, r.ce, r.probs, r.classes

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        return _backward(ctx, grad_loss)


#: The Group Loss's options: one type, defined and validated in the Rust
#: core, taken by :func:`group_loss`, :class:`grouploss.GroupLoss` and the
#: trainer (:func:`grouploss.training.group_loss_options`).
GroupLossOptions = _native.GroupLossOptions


def _require_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in _HALF else t


def _no_autocast(device: torch.device):
    """Our ops pick their own precision; autocast would cast them to half."""
    kind = device.type
    try:
        enabled = torch.is_autocast_enabled(kind)
    except (TypeError, RuntimeError):
        enabled = False
    return torch.autocast(kind, enabled=False) if enabled else contextlib.nullcontext()


def _carries_tangent(*tensors: torch.Tensor) -> bool:
    """Whether a tensor is a dual one of forward-mode AD (inside
    ``torch.autograd.forward_ad.dual_level``)."""
    if getattr(forward_ad, "_current_level", 0) < 0:
        return False
    return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _refuse_tracing() -> None:
    """``torch.jit.trace`` records torch ops only: the Rust core's loss would
    be kept as the constant of the traced batch."""
    if torch.jit.is_tracing():
        raise RuntimeError(
            "group_loss cannot be traced by torch.jit.trace (the trace would keep the "
            "traced batch's loss as a constant): compute the loss outside the traced "
            "module, or export the model alone (grouploss.export)"
        )


def _draw_seed(seed: Optional[int]) -> int:
    """A seed for random anchors: `seed` itself, else one drawn from torch's
    global generator, so ``torch.manual_seed`` makes runs repeatable."""
    if seed is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    return integer("seed", seed, 0, SEED_MAX)


def loss_options(
    options: Optional[GroupLossOptions] = None,
    values: Optional[dict] = None,
    caller: str = "group_loss",
) -> GroupLossOptions:
    """``options`` (default: the release's) with ``values`` (option names)
    applied; the Rust core validates them. A name that is no option is a
    ``TypeError`` of ``caller``, as Python raises for a keyword a function
    does not take, with the option it resembles."""
    if options is not None and not isinstance(options, GroupLossOptions):
        raise TypeError(f"options: expected a GroupLossOptions, got {type(options).__name__}")
    known = GroupLossOptions().to_dict()
    for name in values or ():
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}{hint}")
    if not values:
        return options if options is not None else GroupLossOptions()
    if options is None:
        return GroupLossOptions(**values)
    return options.replace(**values)


def with_option_parameters(func):
    """Shows ``func``'s ``**options`` as the options' keywords with their
    defaults (from the Rust core) in ``help()`` and ``inspect.signature``."""
    sig = inspect.signature(func)
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    defaults = GroupLossOptions().to_dict()
    params += [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=value)
        for name, value in defaults.items()
    ]
    func.__signature__ = sig.replace(parameters=params)
    return func


@with_option_parameters
def group_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    logits: torch.Tensor,
    options: Optional[GroupLossOptions] = None,
    *,
    num_classes: Optional[int] = None,
    return_details: bool = False,
    implementation: str = "auto",
    memory_embeddings: Optional[torch.Tensor] = None,
    memory_labels: Optional[torch.Tensor] = None,
    **option_values: Any,
):
    """The Group Loss of one batch (see :class:`grouploss.GroupLoss`).

    Args:
        embeddings: (batch, dims) floating tensor.
        labels: (batch,) integer class indices in ``[0, num_classes)``.
        logits: (batch, num_classes) classifier outputs on the embeddings.
        options: a :class:`GroupLossOptions` (default: the release's);
            keywords below override its values.
        num_classes: if given, ``logits`` must have this many columns.
        return_details: return a :class:`GroupLossOutput` instead of the loss.
        implementation: ``"auto"`` (closed-form gradients: fused kernels on
            CPU, libtorch ops on other devices), ``"fused_cpu"``,
            ``"libtorch"``, or ``"autograd"`` (autograd through libtorch ops;
            slower). All give the same values and gradients. A backward with
            ``create_graph=True`` (a gradient penalty, a Hessian) gets
            gradients it can differentiate again from each: the closed forms
            then recompute the loss by ``"autograd"`` in their backward.
            Dual tensors of forward-mode AD (``torch.autograd.forward_ad``)
            are computed by ``"autograd"`` whatever is asked. torch.func's
            transforms (``vmap``, ``grad``, ``jacfwd``) and ``torch.jit.trace``
            are refused. In each, an entry of the refined probabilities that
            is exactly 0 (an anchor's zeros, a prior that underflowed, and
            what the replicator steps make of them) passes no gradient: it
            is a constant there, and its gradient, carried, could overflow
            float32 and meet the 0 as ``inf * 0`` (NaN). Where a 0 is a
            product that underflowed instead (a sample many ``sigma`` from
            all others with a gaussian W and a zeroed diagonal), the
            gradient is lost with the value: compute in float64 there.
        memory_embeddings: (M, dims) labelled points from outside the batch
            (a memory of earlier batches' embeddings), or None. They join
            the group as anchors: rows of W and one-hot rows of X that are
            not scored and receive no gradient (they are detached). The NLL
            is averaged over the batch's rows; with ``batch_classes_only``
            the columns are the classes of batch and memory. With a memory,
            every implementation computes through libtorch ops, the
            gradients by autograd. :class:`grouploss.GroupLoss` keeps one
            (``memory_size``).
        memory_labels: (M,) integer classes of ``memory_embeddings``, in
            ``[0, num_classes)``; given with them.

    Keyword options (:class:`GroupLossOptions`' names and defaults):
        temperature: T of the prior ``softmax(logits / T)``. Gradients are
            finite while each row's ``max(logits) - min(logits)`` stays below
            about ``80 * T`` in float32 (``700 * T`` in float64); beyond, the
            prior's label probabilities underflow to exactly 0.
        num_anchors: anchors (labelled points) per class and batch.
        num_iters: replicator-dynamics steps.
        gtg_weight: weight of the NLL of the refined probabilities.
        ce_weight: weight of the cross-entropy of the raw logits.
        similarity: ``"correlation"`` (release), ``"cosine"`` or ``"gaussian"``.
        sigma: bandwidth of the gaussian similarity. In float32 with a
            zeroed diagonal, samples so far from the others (in sigmas) that
            their W entries lie near the bottom of the float range can give a
            wrong loss and NaN gradients: use float64 or a larger sigma.
        similarity_power: sharpness of W, whose entries are raised to this
            power (>= 1; 1 is the release's W). Near pairs keep their weight,
            far ones fade: with many anchors the refinement then behaves like
            a soft nearest-neighbour classifier of the batch.
        zero_diagonal: zero W's diagonal (paper's text) instead of 1 (release).
        anchors: ``"first"`` per class in batch order (release) or ``"random"``.
        seed: seed of ``anchors="random"``; None draws one per call from
            torch's global generator.
        batch_classes_only: refine over the classes present in the batch
            (prior columns restricted and renormalised).

    Returns:
        The 0-d loss tensor, or a :class:`GroupLossOutput`.

    Raises:
        ValueError: naming the argument, for wrong shapes, dtypes, devices,
            label ranges, NaN/Inf values or option values.
        TypeError: an unknown keyword, or an option of the wrong type.
    """
    embeddings = _require_tensor("embeddings", embeddings)
    labels = _require_tensor("labels", labels)
    logits = _require_tensor("logits", logits)
    _refuse_tracing()
    if _carries_tangent(embeddings, logits):
        implementation = "autograd"  # the closed forms have no forward-mode derivative
    opts = loss_options(options, option_values, caller="group_loss")
    return_details = boolean("return_details", return_details)
    call = dict(
        options=opts,
        seed=_draw_seed(opts.seed) if opts.anchors == "random" else None,
        num_classes=None if num_classes is None else integer("num_classes", num_classes),
        implementation=implementation,
    )
    if memory_embeddings is not None or memory_labels is not None:
        call["memory_embeddings"] = _upcast(
            _require_tensor("memory_embeddings", memory_embeddings).detach()
        )
        call["memory_labels"] = _require_tensor("memory_labels", memory_labels)
    embeddings, logits = _upcast(embeddings), _upcast(logits)
    with _no_autocast(embeddings.device):
        if implementation != "autograd" and (
            torch.is_grad_enabled() and (embeddings.requires_grad or logits.requires_grad)
        ):
            if not return_details:
                return _GroupLoss.apply(embeddings, logits, labels, call)
            loss, nll, ce, probs, classes = _GroupLossDetails.apply(
                embeddings, logits, labels, call
            )
        else:
            r = _native.group_loss(
                embeddings, labels, logits, want_grads=False, want_probs=return_details, **call
            )
            loss, nll, ce, probs, classes = r.loss, r.nll, r.ce, r.probs, r.classes
    if return_details:
        return GroupLossOutput(loss, nll, ce, probs, classes)
    return loss


def similarity(
    embeddings: torch.Tensor,
    similarity: str = "correlation",
    zero_diagonal: bool = False,
    *,
    sigma: float = 1.0,
    similarity_power: float = 1.0,
    **renamed: Any,
) -> torch.Tensor:
    """Pairwise similarity W (batch x batch) of the rows of ``embeddings``.

    ``similarity``:

    * ``"correlation"``: rows centred by their mean, then cosine, then
      ``relu`` (Pearson correlation clipped at 0; the release).
    * ``"cosine"``: ``relu`` of the cosine similarity.
    * ``"gaussian"``: ``exp(-|x_i - x_j|^2 / (2 sigma^2))``.

    Every entry is then raised to ``similarity_power`` (>= 1). The diagonal
    is 1, or 0 with ``zero_diagonal``. A row with zero variance
    (correlation) or zero norm (cosine) is similar to no other row (the
    release would give NaN); rows whose centred norm is below 64 machine
    epsilons of their own norm count as such. The names are the loss's;
    0.x's ``kind=`` and ``power=`` still work, with a ``FutureWarning``.
    """
    new = renamed_keywords(
        "similarity", renamed, {"kind": "similarity", "power": "similarity_power"}
    )
    similarity = new.get("similarity", similarity)
    similarity_power = new.get("similarity_power", similarity_power)
    embeddings = _require_tensor("embeddings", embeddings)
    with _no_autocast(embeddings.device):
        return _native.similarity(
            _upcast(embeddings),
            similarity=similarity,
            zero_diagonal=boolean("zero_diagonal", zero_diagonal),
            sigma=number("sigma", sigma),
            similarity_power=number("similarity_power", similarity_power),
        )


def anchor_mask(
    labels: torch.Tensor,
    num_anchors: int,
    anchors: str = "first",
    seed: Optional[int] = None,
    **renamed: Any,
) -> torch.Tensor:
    """Boolean mask of the anchors of a batch.

    ``anchors="first"`` takes the first ``num_anchors`` samples of every
    class in batch order (the release); ``anchors="random"`` draws them with
    ``seed`` (None: from torch's global generator). A class with fewer
    samples than ``num_anchors`` has all of them as anchors. (0.x's
    ``mode=`` still works, with a ``FutureWarning``.)
    """
    anchors = renamed_keywords("anchor_mask", renamed, {"mode": "anchors"}).get("anchors", anchors)
    labels = _require_tensor("labels", labels)
    seed = _draw_seed(seed) if anchors == "random" else 0
    num_anchors = integer("num_anchors", num_anchors)
    return _native.anchor_mask(labels, num_anchors, anchors=anchors, seed=seed)


def refine(
    probs: torch.Tensor,
    w: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    anchor_mask: Optional[torch.Tensor] = None,
    num_iters: int = 1,
    **renamed: Any,
) -> torch.Tensor:
    """Label propagation: anchors, then replicator dynamics.

    Rows of ``probs`` (batch x classes) flagged in ``anchor_mask`` become the
    one-hot vectors of their labels, then ``num_iters`` times
    ``X <- X * (w @ X)`` and each row is divided by its sum, ``w`` being the
    similarity W (:func:`similarity`). A row whose update sums to 0 is left
    unchanged (the release divides 0 by 0 there). Gradients are autograd's
    through these steps, at the zeros of ``probs`` too (the loss, whose
    zeros are constants, passes none there: see :func:`group_loss`); a loss
    of your own on its result can therefore meet the float32 overflows that
    :func:`group_loss` avoids.
    (0.x's ``W=`` still works, with a ``FutureWarning``.)
    """
    w = renamed_keywords("refine", renamed, {"W": "w"}).get("w", w)
    for name, t in (("probs", probs), ("w", w), ("labels", labels), ("anchor_mask", anchor_mask)):
        _require_tensor(name, t)
    with _no_autocast(probs.device):
        num_iters = integer("num_iters", num_iters)
        return _native.refine(_upcast(probs), _upcast(w), labels, anchor_mask, num_iters)


# ------------------------------------------------------------ triplet margin loss


def triplet_margin_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, *, margin: float = 0.1
) -> torch.Tensor:
    """Triplet margin loss over the batch-hard triplets of the batch, with the
    values and gradients of pytorch-metric-learning 2.9.0's
    ``losses.TripletMarginLoss(margin=margin)(embeddings, labels,
    miners.BatchHardMiner()(embeddings, labels))`` (their defaults:
    ``LpDistance(normalize_embeddings=True, p=2, power=1)``,
    ``AvgNonZeroReducer``, ``swap=False``, ``smooth_loss=False``)::

        x = F.normalize(embeddings)             # L2, eps 1e-12
        D = torch.cdist(x, x)                   # Euclidean distances
        P(i) = argmax {D[i, j] : j != i, labels[j] == labels[i]}   # first on ties
        N(i) = argmin {D[i, j] : labels[j] != labels[i]}
        l_i = relu(D[i, P(i)] - D[i, N(i)] + margin)
        loss = mean {l_i : l_i > 0}, or 0 when there is none

    Anchors without a positive (a class with one sample) or without a
    negative (a batch of one class) are dropped. The 0 loss has a zero
    gradient, as PML's ``torch.sum(embeddings * 0)``.

    Args:
        embeddings: (batch, dims) floating tensor, finite; float16 and
            bfloat16 are computed in float32 (PML keeps float16, with another
            distance routine).
        labels: (batch,) integer class labels (any values).
        margin: the margin, a finite number >= 0.

    Returns:
        A 0-d tensor of the embeddings' dtype (float32 for half inputs) and
        device; ``loss.backward()`` fills ``embeddings.grad``.

    Raises:
        TypeError: if ``embeddings`` or ``labels`` is not a tensor.
        ValueError: naming the argument, for a wrong shape, dtype, NaN/Inf
            embeddings, non-integer labels or a negative or non-finite margin.
    """
    for name, value in (("embeddings", embeddings), ("labels", labels)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    margin = number("margin", margin, 0)
    if embeddings.dtype in (torch.float16, torch.bfloat16):
        embeddings = embeddings.float()
    kind = embeddings.device.type
    try:
        autocast_on = torch.is_autocast_enabled(kind)
    except (TypeError, RuntimeError):
        autocast_on = False
    if not autocast_on:
        return _native.triplet_margin_loss(embeddings, labels, margin)
    with torch.autocast(kind, enabled=False):
        return _native.triplet_margin_loss(embeddings, labels, margin)


__all__ += ["triplet_margin_loss"]
