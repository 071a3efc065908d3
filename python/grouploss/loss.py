"""The Group Loss as a ``torch.nn.Module``."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

from . import _native
from . import functional as F
from ._args import boolean, integer, number
from .distributed import abandon_gather, gather_batches

__all__ = ["CosineClassifier", "GroupLoss"]


#: What ``gather_ranks`` gathers, in order.
_GATHERED = ("embeddings", "logits", "labels")


def _check_floating(embeddings: torch.Tensor) -> None:
    if not embeddings.is_floating_point():
        raise ValueError(
            f"embeddings: expected a floating tensor, got dtype {str(embeddings.dtype)[6:]}"
        )


class GroupLoss(nn.Module):
    r"""The Group Loss for deep metric learning (Elezi et al., ECCV 2020).

    The samples of a mini-batch (P classes x K samples) are refined jointly:
    their class probabilities are propagated along the similarities between
    their embeddings, then scored. With the release's defaults one step is:

    .. code-block:: text

        W   = relu(corr(embeddings))          # n x n, Pearson correlation, diag 1
        X   = softmax(logits / temperature)   # n x m prior
        X[anchor] = one_hot(labels[anchor])   # first num_anchors per class
        repeat num_iters times:               # replicator dynamics
            X = X * (W @ X)
            X = X / X.sum(dim=1, keepdim=True)
        loss = gtg_weight * NLL(log(X + 1e-12), labels)
             + ce_weight  * CE(logits, labels)

    Gradients reach the embeddings (through W) and the logits (through the
    prior and the CE term). The computation runs in Rust over libtorch, on
    the inputs' device, with the GIL released.

    Beyond the release (every default below is the release's behaviour):
    ``classifier="cosine"`` (a normalised-softmax classifier, logits
    ``classifier_scale * cos(e, w_c)``), ``normalize_embeddings``,
    ``similarity_power`` (W's entries to a power: a sharper W), and a CE
    warm-up and ramp of the Group Loss term (``gtg_warmup_steps``,
    ``gtg_ramp_steps``), the stand-in for the release's start from a
    network fine-tuned with CE. On glyphs a cosine classifier, a sharp W
    (``similarity_power=8``) and many classes per batch with one anchor
    each (P=20, K=3) lift the Group Loss well above normalised-softmax CE
    and narrowly above a triplet loss with batch-hard mining, in the
    library's trainer and in a plain PyTorch loop alike (see BENCHMARKS.md,
    "Quality on glyphs").

    Args:
        num_classes: number of training classes m (columns of the logits).
        options: a :class:`grouploss.functional.GroupLossOptions` holding the
            loss's options below (from ``temperature`` to
            ``batch_classes_only``); keywords override its values. The
            options are validated by the Rust core, as the trainer's are, and
            kept in :attr:`options` (each also readable and settable as an
            attribute of the module, e.g. ``loss_fn.temperature``).
        embedding_size: if given, the module owns a classifier
            (``classifier``) used when ``forward`` gets no logits, so
            ``loss_fn(embeddings, labels)`` works as a drop-in like
            pytorch-metric-learning's ArcFaceLoss. **Its parameters must be
            given to the optimizer**, e.g.
            ``Adam([*model.parameters(), *loss_fn.parameters()])``. Under
            ``DistributedDataParallel``, wrap the loss too,
            ``loss_fn = DistributedDataParallel(loss_fn)``, so that the
            classifier's gradients are averaged over the ranks like the
            network's (see ``examples/ddp_train.py --loss-classifier``).
        classifier: which classifier the module builds as its layer
            :attr:`classifier`: ``"linear"`` (``nn.Linear(embedding_size,
            num_classes)``, the release) or ``"cosine"`` (a
            :class:`CosineClassifier`: ``classifier_scale * normalize(e) @
            normalize(weight).T``, no bias: normalised softmax). Either way
            its parameters are ``classifier.weight`` (and
            ``classifier.bias``).
        classifier_scale: scale s of the cosine classifier's logits (they lie
            in ``[-s, s]``).
        normalize_embeddings: L2-normalise the embeddings before the
            classifier and the similarity (correlation and cosine W do not
            change; the gaussian W and a linear classifier do).
        temperature: softmax temperature T of the prior (release: 24 CUB,
            79 Cars196, 54 SOP).
        num_anchors: anchors ("labelled points") per class in each batch; their
            prior is replaced by their one-hot label (release: 2 CUB, 3 Cars).
            0 disables anchors.
        num_iters: replicator-dynamics steps (release: 1).
        gtg_weight: weight of the NLL of the refined probabilities; 0 gives the
            CE-only baseline of the paper's ablation.
        ce_weight: weight of the cross-entropy on the raw logits (the release
            adds it; the paper's text does not have it).
        similarity: ``"correlation"`` (release), ``"cosine"`` or
            ``"gaussian"`` (bandwidth ``sigma``).
        sigma: bandwidth of the gaussian similarity (its float32 limit:
            :func:`grouploss.functional.group_loss`).
        similarity_power: sharpness p of W: ``W = relu(S) ** p`` entrywise
            (>= 1; 1 is the release). Far pairs fade faster than near ones;
            for the gaussian W it is the bandwidth ``sigma / sqrt(p)``.
        zero_diagonal: zero the diagonal of W (the paper's text) instead of
            keeping it at 1 (the release).
        anchors: ``"first"``: the first ``num_anchors`` samples of each class
            in batch order (the release; a shuffling sampler makes this
            random); ``"random"``: drawn with ``seed``.
        seed: seed for ``anchors="random"``; every call draws the next anchors
            from a generator seeded with it, whose state is the buffer
            ``anchor_generator_state`` (a resumed run draws the anchors an
            uninterrupted one would). None draws from torch's global
            generator (``torch.manual_seed`` makes it repeatable).
        batch_classes_only: refine over the classes present in the batch only
            (prior columns restricted and renormalised); for datasets with
            thousands of classes.
        gtg_warmup_steps: optimizer steps with the Group Loss term off: CE
            alone, like the release's start from a CE-finetuned network.
            Requires ``ce_weight > 0``. Call :meth:`step` after each
            ``optimizer.step()`` (gradient accumulation and two-view batches
            then count steps, not forward calls); the count is the buffer
            ``num_steps``. Until a first :meth:`step` call, each training
            ``forward`` counts one step, and a ``FutureWarning`` says so when
            that count first changes the weight (the next release stops
            counting forward calls).
        gtg_ramp_steps: after the warm-up, the weight of the Group Loss term
            grows linearly from 0 to ``gtg_weight`` over this many steps.
        implementation: ``"auto"`` computes the gradients in closed form in
            the same call as the loss (fused kernels on CPU, libtorch ops on
            CUDA); ``"fused_cpu"`` and ``"libtorch"`` force one of them;
            ``"autograd"`` records libtorch ops for autograd instead (slower).
            All give the same values, and second derivatives
            (``create_graph=True``): the closed forms recompute the loss by
            ``"autograd"`` in such a backward.
        gather_ranks: under ``torch.distributed``, refine over the global
            batch: every rank's embeddings, logits and labels are gathered
            (with gradients, :func:`grouploss.distributed.gather_batches`),
            W spans the ``world_size x n`` samples, the loss is the same on
            every rank and each rank's gradients reach only its own
            samples. ``DistributedDataParallel`` then averages the
            parameters' gradients over the ranks, which gives the global
            loss's gradient divided by ``world_size``: multiply the loss by
            ``world_size`` (or the learning rate) to step as one process on
            the global batch would. Without a process group it does
            nothing. A batch refused on one rank (wrong shape, labels of
            another length) raises on every rank, so none is left waiting
            in the gather.
        memory_size: keep the embeddings (detached) and labels of the last
            ``memory_size`` samples of earlier training calls; they join
            each group as labelled points (anchors that are not scored and
            receive no gradient), so that a step refines over many more
            classes (see :func:`grouploss.functional.group_loss`'s
            ``memory_embeddings``). The memory is read and written by
            training forward calls only (``module.training`` and grad
            enabled; an evaluation call's loss is that of the batch alone),
            with the gathered batch under ``gather_ranks``; it is the buffers
            ``memory_embeddings`` and ``memory_labels`` (oldest first, in
            the module's dtype), so a state dict carries it. 0: no memory. Under
            ``DistributedDataParallel(loss_fn)`` (a loss owning its
            classifier) DDP copies rank 0's buffers, the memory among them,
            to every rank before each forward: with ``gather_ranks`` the
            memories are equal anyway; without it every rank refines with
            rank 0's memory, and ``DistributedDataParallel(loss_fn,
            broadcast_buffers=False)`` keeps one memory per rank.
        memory_warmup_steps: training forward calls before the memory joins
            the groups (it fills meanwhile): early embeddings drift fast.
            The count is the buffer ``memory_steps``.

    Guards: a zero-variance embedding row (correlation) or zero row (cosine)
    is similar to no other sample instead of producing NaN, and a row whose
    replicator update sums to 0 keeps its previous probabilities.

    Shapes:
        * embeddings: (n, d) floating, n >= 2
        * labels: (n,) integers in ``[0, num_classes)``
        * logits: (n, num_classes), optional if ``embedding_size`` was given
        * output: 0-d tensor, float32 (float64 for float64 inputs)

    Raises:
        ValueError: naming the argument, with what was seen and expected, for
            wrong shapes, dtypes, devices, label ranges, NaN/Inf inputs and
            invalid options.
        RuntimeError: embeddings on another device than the module's own
            classifier (as ``nn.Linear`` raises; move the module with
            ``.to(device)``); with ``gather_ranks``, on the other ranks when
            one rank's batch was refused before the gather.

    Example::

        >>> import torch
        >>> from grouploss import GroupLoss
        >>> loss_fn = GroupLoss(num_classes=100, temperature=24.0, num_anchors=2)
        >>> emb = torch.randn(54, 512, requires_grad=True)   # 6 classes x 9 samples
        >>> logits = torch.randn(54, 100, requires_grad=True)
        >>> labels = torch.arange(6).repeat_interleave(9)
        >>> loss = loss_fn(emb, labels, logits)
        >>> loss.backward()

        Without a classifier of your own:

        >>> loss_fn = GroupLoss(num_classes=100, embedding_size=512)
        >>> opt = torch.optim.Adam([emb, *loss_fn.parameters()])
        >>> loss_fn(emb, labels).backward()

        The glyphs recommendation (the ``glyphs`` preset: a cosine
        classifier, a sharp W, one anchor per class, with P=20 classes x K=3
        samples per batch):

        >>> loss_fn = GroupLoss(num_classes=100, embedding_size=512, classifier="cosine",
        ...                     classifier_scale=16.0, temperature=10.0, num_anchors=1,
        ...                     similarity_power=8.0)
        >>> loss_fn(emb, labels).backward()
    """

    def __init__(
        self,
        num_classes: int,
        options: Optional[F.GroupLossOptions] = None,
        *,
        embedding_size: Optional[int] = None,
        classifier: str = "linear",
        classifier_scale: float = 16.0,
        normalize_embeddings: bool = False,
        gtg_warmup_steps: int = 0,
        gtg_ramp_steps: int = 0,
        implementation: str = "auto",
        gather_ranks: bool = False,
        memory_size: int = 0,
        memory_warmup_steps: int = 0,
        **option_values: Any,
    ) -> None:
        super().__init__()
        # The loss's own options are validated by the Rust core alone.
        self.options = F.loss_options(options, option_values, caller="GroupLoss")
        integer("num_classes", num_classes, 1)
        if embedding_size is not None:
            integer("embedding_size", embedding_size, 1)
        if classifier not in ("linear", "cosine"):
            raise ValueError(f'classifier: expected one of "linear", "cosine", got "{classifier}"')
        classifier_scale = number("classifier_scale", classifier_scale, 0, strict=True)
        normalize_embeddings = boolean("normalize_embeddings", normalize_embeddings)
        gather_ranks = boolean("gather_ranks", gather_ranks)
        integer("gtg_warmup_steps", gtg_warmup_steps, 0)
        integer("gtg_ramp_steps", gtg_ramp_steps, 0)
        integer("memory_size", memory_size, 0)
        integer("memory_warmup_steps", memory_warmup_steps, 0)
        if (gtg_warmup_steps or gtg_ramp_steps) and self.options.ce_weight == 0:
            raise ValueError(
                "ce_weight: expected > 0 with gtg_warmup_steps or gtg_ramp_steps (the warm-up "
                "trains with CE alone), got 0"
            )
        if implementation not in _native.IMPLEMENTATIONS:
            raise ValueError(
                f"implementation: expected one of {_native.IMPLEMENTATIONS}, got {implementation!r}"
            )

        self.num_classes = int(num_classes)
        self.embedding_size = embedding_size
        self.classifier_scale = classifier_scale
        self.normalize_embeddings = normalize_embeddings
        self.gtg_warmup_steps = int(gtg_warmup_steps)
        self.gtg_ramp_steps = int(gtg_ramp_steps)
        self.implementation = implementation
        self.gather_ranks = gather_ranks
        self.memory_size = int(memory_size)
        self.memory_warmup_steps = int(memory_warmup_steps)
        #: The module's own classifier (``embedding_size`` given): an
        #: ``nn.Linear`` or a :class:`CosineClassifier`, as ``classifier``
        #: names; None without ``embedding_size``.
        self.classifier: Optional[nn.Linear] = None
        if embedding_size is not None:
            if classifier == "cosine":
                self.classifier = CosineClassifier(
                    int(embedding_size), self.num_classes, scale=self.classifier_scale
                )
            else:
                self.classifier = nn.Linear(int(embedding_size), self.num_classes)
        # The module's state has the same keys whatever the options.
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("anchor_generator_state", self._generator_state())
        # The memory, oldest first (shaped by the first batch it takes), and
        # the training calls that wrote it.
        self.register_buffer("memory_embeddings", torch.zeros(0, 0))
        self.register_buffer("memory_labels", torch.zeros(0, dtype=torch.long))
        self.register_buffer("memory_steps", torch.zeros((), dtype=torch.long))
        # Forward calls counted as steps before a first `step()` call.
        self._forward_steps: Optional[int] = 0

    @property
    def classifier_kind(self) -> str:
        """Deprecated: ``"cosine"`` if :attr:`classifier` is a
        :class:`CosineClassifier`, else ``"linear"``."""
        warnings.warn(
            "GroupLoss.classifier_kind is deprecated: the classifier is the layer "
            "GroupLoss.classifier (an nn.Linear or a CosineClassifier); it goes in the "
            "next release",
            FutureWarning,
            stacklevel=2,
        )
        return "cosine" if isinstance(self.classifier, CosineClassifier) else "linear"

    @property
    def options(self) -> F.GroupLossOptions:
        """The loss's :class:`~grouploss.functional.GroupLossOptions`
        (settable, as each of its options is: options with another ``seed``
        start the anchors' generator again from it, as assigning
        :attr:`seed` always does)."""
        return self._options

    @options.setter
    def options(self, value: F.GroupLossOptions) -> None:
        if not isinstance(value, F.GroupLossOptions):
            raise TypeError(f"options: expected a GroupLossOptions, got {type(value).__name__}")
        old = self.__dict__.get("_options")
        self._options = value
        if old is None or old.seed != value.seed:
            self._reseed()

    @property
    def seed(self) -> Optional[int]:
        """The option ``seed`` of :attr:`options`; assigning it starts the
        anchors' generator again from it (None: torch's global generator)."""
        return self._options.seed

    @seed.setter
    def seed(self, value: Optional[int]) -> None:
        self._options = self._options.replace(seed=value)
        self._reseed()

    def _reseed(self) -> None:
        self._generator: Optional[torch.Generator] = None
        if self._options.seed is not None:
            self._generator = torch.Generator().manual_seed(int(self._options.seed))
        if "anchor_generator_state" in self._buffers:
            self.anchor_generator_state = self._generator_state()

    def __setstate__(self, state: dict) -> None:
        if "options" in state:  # pickled before options was a property
            state = dict(state)
            state["_options"] = state.pop("options")
        super().__setstate__(state)

    def _generator_state(self) -> torch.Tensor:
        if self._generator is None:
            return torch.zeros(0, dtype=torch.uint8)
        return self._generator.get_state()

    def step(self) -> None:
        """Advances the warm-up and ramp schedule by one optimizer step; call
        it after each ``optimizer.step()``."""
        if self._forward_steps is not None:
            # From now on the caller counts: undo what forward counted.
            self.num_steps -= self._forward_steps
            self._forward_steps = None
        self.num_steps += 1

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        key = prefix + "anchor_generator_state"
        if key in state_dict:  # takes the saved generator's size
            self.anchor_generator_state = torch.empty_like(state_dict[key], device="cpu")
        for name in _MEMORY_BUFFERS[:2]:  # embeddings and labels
            saved = state_dict.get(prefix + name)
            if saved is not None:  # takes the saved memory's size, in the module's dtype
                mine = getattr(self, name)
                setattr(self, name, mine.new_empty(saved.shape))
        for old in ("num_steps", "anchor_generator_state", *_MEMORY_BUFFERS):
            if prefix + old not in state_dict:
                # State dicts of 0.x (no step count without a schedule, no
                # generator state) and of versions before the memory.
                warnings.warn(
                    f"{prefix}{old}: missing from the state dict (saved by an older "
                    "grouploss); kept as constructed. Save it again to include it.",
                    FutureWarning,
                    stacklevel=4,
                )
                state_dict[prefix + old] = getattr(self, old)
        super()._load_from_state_dict(state_dict, prefix, *args)
        saved = self.anchor_generator_state
        if saved.numel():
            if self._generator is None:
                self._generator = torch.Generator()
            self._generator.set_state(saved.cpu())

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.to_dict().items())
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, {opts}, "
            f"normalize_embeddings={self.normalize_embeddings}, "
            f"gtg_warmup_steps={self.gtg_warmup_steps}, gtg_ramp_steps={self.gtg_ramp_steps}, "
            f"gather_ranks={self.gather_ranks}, memory_size={self.memory_size}, "
            f"memory_warmup_steps={self.memory_warmup_steps}"
        )

    def current_gtg_weight(self) -> float:
        """The weight of the Group Loss term at the current step: 0 during the
        warm-up, then ramped linearly to ``gtg_weight``."""
        if not (self.gtg_warmup_steps or self.gtg_ramp_steps):
            return self.options.gtg_weight
        t = int(self.num_steps.item()) - self.gtg_warmup_steps
        if t < 0:
            return 0.0
        if self.gtg_ramp_steps > 0:
            return self.options.gtg_weight * min(1.0, t / self.gtg_ramp_steps)
        return self.options.gtg_weight

    def _anchor_seed(self) -> Optional[int]:
        if self.options.anchors != "random" or self._generator is None:
            return None
        seed = int(torch.randint(0, 2**62, (1,), generator=self._generator).item())
        self.anchor_generator_state = self._generator.get_state()
        return seed

    def compute_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Logits of the module's own classifier, in the embeddings' dtype and
        on their device (gradients still reach the classifier's parameters).
        With ``normalize_embeddings`` the embeddings are normalised first."""
        if self.classifier is None:
            raise ValueError(
                "logits: expected a (batch, num_classes) tensor, got None; pass logits or "
                "construct GroupLoss with embedding_size=... so that it owns a classifier"
            )
        embeddings = F._require_tensor("embeddings", embeddings)
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings: expected shape (batch, {self.embedding_size}) (embedding_size), "
                f"got {list(embeddings.shape)}"
            )
        _check_floating(embeddings)
        if embeddings.device != self.classifier.weight.device:
            # RuntimeError, as nn.Linear raises for inputs on another device.
            raise RuntimeError(
                f"embeddings: expected a tensor on {self.classifier.weight.device} (the "
                f"device of GroupLoss's classifier; move the module with .to(device) like "
                f"any nn.Module), got one on {embeddings.device}"
            )
        x = F._upcast(embeddings)
        if self.normalize_embeddings:
            x = nn.functional.normalize(x, dim=1, eps=1e-12)
        if isinstance(self.classifier, CosineClassifier):
            return self.classifier(x)
        weight = self.classifier.weight.to(dtype=x.dtype)
        bias = self.classifier.bias
        assert bias is not None  # the linear classifier has one
        return nn.functional.linear(x, weight, bias.to(dtype=x.dtype))

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        logits: Optional[torch.Tensor] = None,
        *,
        return_details: bool = False,
    ):
        """The loss of a batch.

        Args:
            embeddings: (n, d) floating tensor.
            labels: (n,) integer class indices in ``[0, num_classes)``.
            logits: (n, num_classes) classifier outputs; if None, the module's
                own classifier (``embedding_size``) computes them.
            return_details: return a :class:`grouploss.functional.GroupLossOutput`
                (loss, nll, ce, refined probabilities) instead of the loss.
        """
        if not self.gather_ranks:
            return_details = boolean("return_details", return_details)
            embeddings, logits = self._prepared(embeddings, logits)
        else:
            try:
                return_details = boolean("return_details", return_details)
                embeddings, logits = self._prepared(embeddings, logits)
                embeddings = F._require_tensor("embeddings", embeddings)
                labels = F._require_tensor("labels", labels)
                logits = F._require_tensor("logits", logits)
            except Exception:
                # The other ranks wait in the gather: they raise too.
                abandon_gather(len(_GATHERED))
                raise
            embeddings, logits, labels = gather_batches(embeddings, logits, labels, names=_GATHERED)
        memory = self._memory_for(embeddings)
        opts = self.options
        gtg_weight = self.current_gtg_weight()
        if gtg_weight != opts.gtg_weight:
            opts = opts.replace(gtg_weight=gtg_weight)
        seed = self._anchor_seed()
        if seed is not None:
            opts = opts.replace(seed=seed)
        if self._counts_forward_calls():
            self.num_steps += 1
        out = F.group_loss(
            embeddings,
            labels,
            logits,
            opts,
            num_classes=self.num_classes,
            return_details=return_details,
            implementation=self.implementation,
            **memory,
        )
        self._remember(embeddings, labels)
        return out

    def _prepared(self, embeddings, logits):
        """The logits (the module's classifier's when None) and the
        embeddings, normalised with ``normalize_embeddings``."""
        if logits is None:
            logits = self.compute_logits(embeddings)
        if self.normalize_embeddings:
            embeddings = F._require_tensor("embeddings", embeddings)
            _check_floating(embeddings)
            embeddings = nn.functional.normalize(F._upcast(embeddings), dim=1, eps=1e-12)
        return embeddings, logits

    def _writes_memory(self) -> bool:
        return self.memory_size > 0 and self.training and torch.is_grad_enabled()

    def _memory_for(self, embeddings: torch.Tensor) -> dict:
        """The memory's keywords of this call: empty before the warm-up ends
        or without a memory."""
        if not self._writes_memory() or len(self.memory_labels) == 0:
            return {}
        if int(self.memory_steps.item()) < self.memory_warmup_steps:
            return {}
        mem = self.memory_embeddings
        if isinstance(embeddings, torch.Tensor):
            mem = mem.to(device=embeddings.device, dtype=F._upcast(embeddings).dtype)
        return {"memory_embeddings": mem, "memory_labels": self.memory_labels.to(mem.device)}

    def _remember(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Appends the batch to the memory (after the loss is computed: a
        batch never joins its own group), keeping the last
        ``memory_size`` rows. The memory keeps the module's dtype (that of
        its buffer: ``.double()`` makes it float64), whatever the batch's."""
        if not self._writes_memory():
            return
        self.memory_embeddings, self.memory_labels = _native.memory_push(
            self.memory_embeddings,
            self.memory_labels,
            embeddings.detach().to(self.memory_embeddings.dtype),
            labels.detach(),
            self.memory_size,
        )
        self.memory_steps += 1

    def _counts_forward_calls(self) -> bool:
        """Whether this training forward counts as a step: only with a
        schedule and until the caller's first :meth:`step`."""
        scheduled = self.gtg_warmup_steps or self.gtg_ramp_steps
        if self._forward_steps is None or not scheduled:
            return False
        if not (self.training and torch.is_grad_enabled()):
            return False
        if self._forward_steps == max(1, self.gtg_warmup_steps):
            # The first forward whose count changes the weight, unless step()
            # is called: a caller who calls it has done so by now.
            warnings.warn(
                "GroupLoss: the warm-up counted forward calls as steps; call "
                "loss_fn.step() after each optimizer.step() (the next release stops "
                "counting forward calls)",
                FutureWarning,
                stacklevel=3,
            )
        self._forward_steps += 1
        return True


#: The memory's buffers (state dicts saved before it existed lack them).
_MEMORY_BUFFERS = ("memory_embeddings", "memory_labels", "memory_steps")


def _option_property(name: str) -> property:
    def get(self):
        return getattr(self.options, name)

    def set(self, value):
        self.options = self.options.replace(**{name: value})

    return property(get, set, doc=f"The option ``{name}`` of :attr:`options` (settable).")


for _name in F.GroupLossOptions.NAMES:
    if _name != "seed":  # its own property: assigning it reseeds
        setattr(GroupLoss, _name, _option_property(_name))
GroupLoss.__init__ = F.with_option_parameters(GroupLoss.__init__)


class CosineClassifier(nn.Linear):
    """A normalised-softmax classifier: ``scale * normalize(x) @
    normalize(weight).T``, no bias (initialised as ``nn.Linear``, whose
    parameter ``weight`` it keeps)."""

    def __init__(self, in_features: int, out_features: int, *, scale: float = 16.0) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.scale = number("scale", scale, 0, strict=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.normalize(x, dim=1, eps=1e-12)
        weight = nn.functional.normalize(self.weight.to(dtype=x.dtype), dim=1, eps=1e-12)
        return nn.functional.linear(x, weight) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}"
