"""paramdyn: train grids of image classifiers and measure how their parameters move.

One module per concept: ``catalog`` (registries), ``config`` (validation and run grids),
``data``, ``models``, ``inits``, ``train``, ``checkpoints``, ``measures``, ``tables``
(Parquet files), ``plots`` and ``provenance`` (code hashes that trigger reruns).
"""

__version__ = "0.1.0"
