"""The data layer of ``kflo train``: named data sets as in-memory ``torch`` data sets with seeded splits.

Besides the usual train/validation/test splits it implements the two data settings of the papers kflo follows:
the KFLO paper's (Henig & Giryes) transfer-learning setting that trains on a stratified fraction of the training
set (``train_fraction=0.4``), and the ExpandNets paper's (Guo, Alvarez & Salzmann, NeurIPS 2020) corrupted-label
study, where a fraction of the training labels is replaced by a uniformly random other class (``label_noise``).

The modules:

- :mod:`kflo_cli.data.bundle`: :class:`DataBundle`, :func:`build_data` and :func:`model_input_for`, the API;
- :mod:`kflo_cli.data.catalog`: the named data sets, their statistics, augmentations and loaders;
- :mod:`kflo_cli.data.splits`: seeded stratified splits, class fractions and label noise;
- :mod:`kflo_cli.data.sets`: the ``torch`` data sets (per-item conversion, resizing, augmentation);
- :mod:`kflo_cli.data.formats`: the readers of the on-disk formats and the downloads.

docs/data.md has the data sets, where their files go, the augmentations and the decisions behind them.

Example:
    >>> bundle = build_data("digits", img_size=28, val_split=0.1, seed=1)
    >>> x, y = bundle.train[0]
    >>> tuple(x.shape), bundle.num_classes
    ((1, 28, 28), 10)
"""

from .bundle import DataBundle, build_data, model_input_for
from .catalog import AUGMENT, DATASETS, STATS
from .splits import class_subset, corrupt_labels, stratified_split

__all__ = ["AUGMENT", "DATASETS", "STATS", "DataBundle", "build_data", "class_subset", "corrupt_labels", "model_input_for", "stratified_split"]
