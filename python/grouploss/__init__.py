"""grouploss: the Group Loss for deep metric learning, with a Rust core.

>>> from grouploss import GroupLoss
>>> loss_fn = GroupLoss(num_classes=100)          # the release's CUB defaults
>>> loss = loss_fn(embeddings, labels, logits)   # doctest: +SKIP

See ``help(grouploss.GroupLoss)`` for the computation and its options.
"""

# torch first: the native module links the libtorch that torch loads.
import torch  # noqa: F401  isort: skip

from . import _native  # noqa: E402  isort: skip
from . import data, datasets, export, functional, metrics, models  # noqa: E402
from .functional import GroupLossOptions  # noqa: E402
from .index import Index  # noqa: E402
from .loss import GroupLoss  # noqa: E402
from .report import RunInspection, report  # noqa: E402
from .sampler import ClassBalancedBatchSampler  # noqa: E402
from .training import TrainResult, load_run, train  # noqa: E402

__version__: str = _native.__version__

# `grouploss.report` is the function; its module is reached by
# `from grouploss.report import ...`.

__all__ = [
    "ClassBalancedBatchSampler",
    "GroupLoss",
    "GroupLossOptions",
    "Index",
    "RunInspection",
    "TrainResult",
    "data",
    "datasets",
    "export",
    "functional",
    "load_run",
    "metrics",
    "models",
    "report",
    "train",
    "__version__",
]
