"""paramdyn: train grids of image classifiers and measure how their parameters move.

One module per concept: ``catalog`` (registries), ``config`` (validation and run grids),
``data``, ``models``, ``inits``, ``train``, ``checkpoints``, ``measures``, ``features``
(features and their similarity), ``perturb``, ``tables`` (Parquet files), ``plots``,
``gpus`` (GPU leasing), ``provenance`` (code hashes that trigger reruns), ``cli``
(``paramdyn disk``) and ``jobs`` (one entry point per workflow rule).
"""

__version__ = "0.1.0"
