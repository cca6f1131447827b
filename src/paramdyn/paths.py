"""Where the workflow's files live: one spelling of each path, for the rules and the package.

Pure strings (no torch, no I/O), so the Snakemake scheduler imports it while it parses the
rules. Each function takes the path's parts; called with its defaults it returns the
wildcard pattern a rule declares (``run_dir()`` is ``results/{study}/runs/{run_id}``).
"""

from __future__ import annotations

RESULTS = "results"

# the files of a run directory
RUN_JSON = "run.json"  # written last: the mark of a finished run
CHECKPOINTS = "checkpoints"  # step<8 digits>.safetensors
GRAD_REACHED = "grad_reached.safetensors"  # gradients.track_reached's masks


def dataset_file(dataset: str = "{dataset}") -> str:
    """A prepared dataset, shared by all studies."""
    return f"{RESULTS}/datasets/{dataset}.safetensors"


def download_marker(dataset: str = "{dataset}") -> str:
    """The mark of a downloaded torchvision dataset (its files' SHA-256)."""
    return f"{RESULTS}/datasets/{dataset}.download.json"


def study_dir(study: str = "{study}") -> str:
    return f"{RESULTS}/{study}"


def run_dir(study: str = "{study}", run_id: str = "{run_id}") -> str:
    """A run's published outputs: run.json, its tables, checkpoints and features."""
    return f"{study_dir(study)}/runs/{run_id}"


def run_file(filename: str, study: str = "{study}", run_id: str = "{run_id}") -> str:
    return f"{run_dir(study, run_id)}/{filename}"


def work_dir(study: str = "{study}", run_id: str = "{run_id}") -> str:
    """Where a run trains (snapshots for resuming), outside the rule's declared outputs; kept
    as a cache of the finished run."""
    return f"{RESULTS}/.work/{study}/{run_id}"


def pair_file(filename: str, study: str = "{study}", pair: str = "{pair}") -> str:
    """A file of one interpolation pair (``path.parquet``, ``distances.parquet``)."""
    return f"{study_dir(study)}/pairs/{pair}/{filename}"


def study_table(name: str, study: str = "{study}") -> str:
    """A study's table (``distances``, ``history``, …) as Parquet."""
    return f"{study_dir(study)}/{name}.parquet"


def study_file(filename: str, study: str = "{study}") -> str:
    """Another file of a study's folder (``accuracy.md``, ``findings.md``)."""
    return f"{study_dir(study)}/{filename}"


def figure(name: str, study: str = "{study}") -> str:
    return f"{study_dir(study)}/figures/{name}.png"


def source_run(init_source: str) -> tuple[str, str]:
    """``(study, run_id)`` of a run's ``init_source`` (``<study>/<run_id>``)."""
    study, run_id = init_source.split("/", 1)
    return study, run_id
