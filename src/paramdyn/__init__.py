"""paramdyn: train grids of image classifiers and measure how their parameters move.

One module per concept: ``catalog`` (registries), ``config`` (validation and run grids),
``data``, ``models``, ``inits``, ``train``, ``checkpoints``, ``measures``, ``features``
(features and their similarity), ``perturb``, ``tables`` (Parquet files), ``plots``,
``gpus`` (GPU leasing), ``provenance`` (code hashes that trigger reruns), ``cli``
(``paramdyn disk``) and ``jobs`` (one entry point per workflow rule); and the small
torch-free modules the rules and the package share: ``paths`` (where files live),
``columns`` (the tables' grid coordinates), ``runs`` (a finished run's run.json),
``devices`` (the device choice) and ``atomic`` (atomic writes).
"""

__version__ = "0.1.0"
