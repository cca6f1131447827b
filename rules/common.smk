# Shared helpers of the rules: no torch here, the scheduler stays light.
from dataclasses import asdict

from paramdyn import catalog, paths
from paramdyn.devices import detect_device
from paramdyn.provenance import code_hash

DATA_DIR = config["data_dir"]
DEVICE = detect_device(config["device"])
# Snakemake's `gpu` resource: each CUDA training job takes one.
GPU_PER_TRAIN = 1 if DEVICE == "cuda" else 0
ENV = "../envs/paramdyn.yaml"


wildcard_constraints:
    study="|".join(STUDIES) or "NO-STUDY",
    run_id="[^/]+",
    pair="[^/]+",
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
    inputs = {"dataset": paths.dataset_file(spec.dataset)}
    if spec.init_source:
        inputs["source"] = source_run_json(wildcards)
    return inputs


def run_paths(study, filename, runs=None):
    return [paths.run_file(filename, study, r) for r in (runs or STUDIES[study].runs)]


# per-run tables concatenated into one per study by rule aggregate
RUN_TABLES = ("distances", "history", "gradients", "frozen")
# the figures of rules plot_distances and plot_distance_steps, by reference
DISTANCE_FIGURES = ("init", "previous", "init_raw", "previous_raw", "average")
STEP_FIGURES = ("init", "previous")


def branch_tables(wildcards):
    """The perturbation tables of a study's perturb-and-retrain branches."""
    branches = [r for r, s in STUDIES[wildcards.study].runs.items() if s.perturbation]
    return run_paths(wildcards.study, "perturbation.parquet", branches)


def similarity_inputs(wildcards):
    runs = {r for a, b, _ in STUDIES[wildcards.study].similarity_pairs for r in (a, b)}
    runs = sorted(runs) or list(STUDIES[wildcards.study].runs)
    return run_paths(wildcards.study, "features.safetensors", runs)


def source_run_json(wildcards):
    """run.json of the run whose final weights this run starts from (from_run, a branch)."""
    study, run_id = paths.source_run(run_spec(wildcards).init_source)
    return paths.run_file(paths.RUN_JSON, study, run_id)


def study_targets():
    table, figure = paths.study_table, paths.figure
    targets = []
    for study in (s for s in STUDIES if STUDIES[s].target):
        targets += [
            table("findings", study),
            paths.study_file("findings.md", study),
            table("distances", study),
            table("history", study),
            table("gradients", study),
            *[figure(f"distance_vs_depth_{name}", study) for name in DISTANCE_FIGURES],
            *[figure(f"distance_vs_step_{name}", study) for name in STEP_FIGURES],
            figure("gradients_vs_depth", study),
            table("frozen", study),
            figure("frozen", study),
            figure("change", study),
            table("accuracy", study),
            paths.study_file("accuracy.md", study),
            figure("accuracy", study),
            figure("loss", study),
        ]
        if STUDIES[study].features.get("enabled", True):
            targets += [
                table("similarity", study),
                figure("cka", study),
                figure("feature_correlation", study),
            ]
        if any(s.perturbation for s in STUDIES[study].runs.values()):
            targets += [table("perturbations", study), figure("perturbations", study)]
        targets += basin_targets(study)
        targets += analysis_targets(study)
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
    return {name: paths.study_table(name, wildcards.study) for name in sorted(names)}


def download_marker(wildcards):
    if catalog.DATASETS[wildcards.dataset].source == "torchvision":
        return [paths.download_marker(wildcards.dataset)]
    return []


# --- same basin: the study's interpolation pairs ---------------------------------------------

# the figures of rule plot_barriers
BARRIER_FIGURES = (
    "barrier_path_error",
    "barrier_path_loss",
    "barrier_heights",
    "pair_distances",
)


def interpolation_pairs(study):
    """The study's interpolation pairs as plain dicts (pair, kind, run_a, end_a, run_b,
    end_b), or none when its interpolation is off."""
    s = STUDIES[study]
    if not s.interpolation.get("enabled"):
        return []
    return [p if isinstance(p, dict) else asdict(p) for p in s.interpolation_pairs]


def interpolation_pair(wildcards):
    for pair in interpolation_pairs(wildcards.study):
        if pair["pair"] == wildcards.pair:
            return pair
    raise ValueError(
        f"no interpolation pair {wildcards.pair} in study {wildcards.study}"
    )


def pair_inputs(wildcards):
    """The two runs of a pair (their run.json, written last) and the dataset."""
    pair = interpolation_pair(wildcards)
    run = STUDIES[wildcards.study].runs[pair["run_a"]]
    return {
        "run_a": paths.run_file(paths.RUN_JSON, wildcards.study, pair["run_a"]),
        "run_b": paths.run_file(paths.RUN_JSON, wildcards.study, pair["run_b"]),
        "dataset": paths.dataset_file(run.dataset),
    }


def pair_paths(study, filename):
    return [
        paths.pair_file(filename, study, p["pair"]) for p in interpolation_pairs(study)
    ]


def basin_targets(study):
    if not interpolation_pairs(study):
        return []
    return [
        paths.study_table("barriers", study),
        paths.study_table("pair_distances", study),
        *[paths.figure(name, study) for name in BARRIER_FIGURES],
    ]


# --- offline analyses: curvature, weight spectra, layer-wise CKA (paramdyn.analyses) ----------

# the figures of rule plot_analyses, by analysis
ANALYSIS_FIGURES = {
    "curvature": ("sharpness_vs_step",),
    "spectra": ("spectra_vs_depth",),
    "layer_similarity": ("layer_cka_pairs", "layer_cka_over_steps"),
}


def analysis_options(study, name):
    return STUDIES[study].analyses.get(name) or {}


def analysis_runs(study, name):
    """The runs an enabled analysis of the study reads (none when it is off)."""
    from paramdyn.analyses import analysed_runs

    options = analysis_options(study, name)
    if not options.get("enabled"):
        return []
    return analysed_runs(STUDIES[study].runs, options.get("where"))


def analysis_tables(study, name, filename):
    return run_paths(study, filename, analysis_runs(study, name))


def layer_similarity_pairs(study):
    from paramdyn.analyses import layer_pairs

    runs = STUDIES[study].runs
    kept = {r: runs[r] for r in analysis_runs(study, "layer_similarity")}
    kinds = analysis_options(study, "layer_similarity").get("pairs", [])
    return layer_pairs(kept, kinds)


def analysis_targets(study):
    targets = []
    for name, figures in ANALYSIS_FIGURES.items():
        if analysis_runs(study, name):
            targets += [paths.study_table(name, study)]
            targets += [paths.figure(f, study) for f in figures]
    return targets


# figure -> the analysis whose study table it draws
FIGURE_ANALYSIS = {f: name for name, figs in ANALYSIS_FIGURES.items() for f in figs}


def analysis_inputs(wildcards):
    return {
        "run_json": paths.run_file(paths.RUN_JSON, wildcards.study, wildcards.run_id),
        "dataset": paths.dataset_file(run_spec(wildcards).dataset),
    }
