# Shared helpers of the rules: no torch here, the scheduler stays light.
from dataclasses import asdict

from paramdyn import catalog
from paramdyn.config import detect_device
from paramdyn.provenance import code_hash

DATA_DIR = config["data_dir"]
DEVICE = detect_device(config["device"])
# Snakemake's `gpu` resource: each CUDA training job takes one.
GPU_PER_TRAIN = 1 if DEVICE == "cuda" else 0
RUN_DIR = "results/{study}/runs/{run_id}"
ENV = "../envs/paramdyn.yaml"


wildcard_constraints:
    study="|".join(STUDIES) or "NO-STUDY",
    run_id="[^/]+",
    dataset="|".join(catalog.DATASETS),


def run_spec(wildcards):
    try:
        return STUDIES[wildcards.study].runs[wildcards.run_id]
    except KeyError:
        raise ValueError(
            f"no run {wildcards.run_id} in study {wildcards.study} of this config"
        ) from None


def train_inputs(wildcards):
    """The prepared dataset, and for init from_run the source run (an edge of the DAG)."""
    spec = run_spec(wildcards)
    inputs = {"dataset": f"results/datasets/{spec.dataset}.safetensors"}
    if spec.init_source:
        study, run_id = spec.init_source.split("/", 1)
        inputs["source"] = f"results/{study}/runs/{run_id}/run.json"
    return inputs


def run_paths(study, filename, runs=None):
    return [
        f"results/{study}/runs/{r}/{filename}" for r in (runs or STUDIES[study].runs)
    ]


# per-run tables concatenated into one per study by rule aggregate
RUN_TABLES = ("distances", "history", "gradients", "frozen")


def branch_tables(wildcards):
    """The perturbation tables of a study's perturb-and-retrain branches."""
    branches = [r for r, s in STUDIES[wildcards.study].runs.items() if s.perturbation]
    return run_paths(wildcards.study, "perturbation.parquet", branches)


def similarity_inputs(wildcards):
    runs = {r for a, b, _ in STUDIES[wildcards.study].similarity_pairs for r in (a, b)}
    runs = sorted(runs) or list(STUDIES[wildcards.study].runs)
    return run_paths(wildcards.study, "features.safetensors", runs)


def source_run_json(wildcards):
    study, run_id = run_spec(wildcards).init_source.split("/", 1)
    return f"results/{study}/runs/{run_id}/run.json"


def study_targets():
    targets = []
    for study in (s for s in STUDIES if STUDIES[s].target):
        targets += [
            f"results/{study}/findings.parquet",
            f"results/{study}/findings.md",
            f"results/{study}/distances.parquet",
            f"results/{study}/history.parquet",
            f"results/{study}/gradients.parquet",
            *[
                f"results/{study}/figures/distance_vs_depth_{name}.png"
                for name in ("init", "previous", "init_raw", "previous_raw", "average")
            ],
            *[
                f"results/{study}/figures/distance_vs_step_{name}.png"
                for name in ("init", "previous")
            ],
            f"results/{study}/figures/gradients_vs_depth.png",
            f"results/{study}/frozen.parquet",
            f"results/{study}/figures/frozen.png",
            f"results/{study}/figures/change.png",
            f"results/{study}/accuracy.parquet",
            f"results/{study}/accuracy.md",
            f"results/{study}/figures/accuracy.png",
            f"results/{study}/figures/loss.png",
        ]
        if STUDIES[study].features.get("enabled", True):
            targets += [
                f"results/{study}/similarity.parquet",
                f"results/{study}/figures/cka.png",
                f"results/{study}/figures/feature_correlation.png",
            ]
        if any(s.perturbation for s in STUDIES[study].runs.values()):
            targets += [
                f"results/{study}/perturbations.parquet",
                f"results/{study}/figures/perturbations.png",
            ]
    return targets


# The report's menu sorts categories alphabetically; the leading no-break space puts the
# findings before the studies' own categories.
FINDINGS_CATEGORY = "\u00a0Findings"


def findings_inputs(wildcards):
    """The tables the study's claims read (catalog.CLAIM_TESTS), and history (the runs'
    coordinates and accuracies, for the training check). A claim this variant cannot test
    needs no table."""
    study = STUDIES[wildcards.study]
    names = {"history"}
    for claim in study.claims:
        if not claim["note"]:
            names.update(catalog.CLAIM_TESTS[claim["test"]].tables)
    return {name: f"results/{wildcards.study}/{name}.parquet" for name in sorted(names)}


def download_marker(wildcards):
    if catalog.DATASETS[wildcards.dataset].source == "torchvision":
        return [f"results/datasets/{wildcards.dataset}.download.json"]
    return []
