"""Entry points of the workflow's jobs: one function per rule, called by the thin scripts in
``scripts/`` with Snakemake's ``snakemake`` object. Each sends logging to the rule's log
file and calls one function of the concept modules with plain paths.

Each function imports the modules of its job when it runs, not at the top: a job loads only
what it needs (most table and figure jobs never import torch), and the training job leases its
GPU before torch starts."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def _logged(smk):
    log_path = Path(smk.log[0])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield logging.getLogger(f"paramdyn.{smk.rule}")
    except Exception:
        logging.getLogger(f"paramdyn.{smk.rule}").exception("job failed")
        raise
    finally:
        root.removeHandler(handler)
        handler.close()


def download_dataset(smk) -> None:
    from .data import download

    with _logged(smk) as log:
        log.info("fetching %s into %s", smk.wildcards.dataset, smk.params.data_dir)
        download(
            smk.wildcards.dataset,
            smk.params.data_dir,
            smk.output[0],
            allow_download=smk.params.allow_download,
        )


def prepare_dataset(smk) -> None:
    from .data import prepare

    with _logged(smk) as log:
        meta = prepare(smk.wildcards.dataset, smk.params.data_dir, smk.output[0])
        log.info("prepared %s: %s", smk.wildcards.dataset, meta)


def train(smk) -> None:
    from .config import RunSpec
    from .devices import detect_device
    from .gpus import lease_gpu
    from .runs import FinishedRun

    with _logged(smk) as log:
        # one GPU of a multi-GPU box for this job, before CUDA starts (a no-op under SLURM,
        # which sets CUDA_VISIBLE_DEVICES, and with one GPU or none)
        if detect_device(smk.config.get("device", "auto")) == "cuda":
            lease_gpu(log)
        from .train import train_run  # after the lease: CUDA_VISIBLE_DEVICES first

        spec = RunSpec.from_dict(json.loads(smk.params.hparams))
        source = None
        if spec.init_source:  # the source run's final checkpoint, or its branch_step's
            run, step = FinishedRun.read(smk.input.source), spec.branch_step
            source = run.final_checkpoint if step is None else run.checkpoint_at(step)
        # execution settings come from the config, not params: moving a study from CPU to
        # GPU must not count as a change of its hyper-parameters
        train_run(
            spec,
            smk.input.dataset,
            Path(smk.output.run_json).parent,
            work_dir=smk.params.work_dir,
            code=smk.params.code,
            device=smk.config.get("device", "auto"),
            threads=smk.threads,
            snapshot_seconds=smk.config.get("snapshot_seconds", 300),
            deterministic=smk.config.get("deterministic", False),
            init_checkpoint=source,
        )


def distances(smk) -> None:
    from .checkpoints import drop_step_checkpoints
    from .measures import frozen_table, run_distances
    from .paths import GRAD_REACHED
    from .runs import FinishedRun

    with _logged(smk) as log:
        run = FinishedRun.read(smk.input.run_json)
        df = run_distances(smk.input.checkpoints, run, smk.output.distances)
        log.info("%d rows for %s", len(df), run.run_id)
        frozen_table(df, run.dir / GRAD_REACHED, run, smk.output.frozen)
        if not smk.params.keep_steps:
            dropped = drop_step_checkpoints(smk.input.checkpoints, smk.params.work_dir)
            log.info("dropped %d mid-epoch checkpoints (keep_steps: false)", dropped)


def aggregate(smk) -> None:
    from .tables import aggregate as concat

    with _logged(smk) as log:
        for name, out in smk.output.items():
            paths = list(smk.input[name])
            flags = smk.params.get("gradient_flags") if name == "gradients" else None
            df = concat(paths, out, gradient_flags=flags)
            log.info("%s: %d rows from %d runs", name, len(df), len(paths))


def plot_distances(smk) -> None:
    from .plots import distance_average, distance_vs_depth

    with _logged(smk):
        metric, raw = smk.params.metric, "l1"
        for reference in ("init", "previous"):
            distance_vs_depth(smk.input[0], smk.output[reference], reference, metric)
            distance_vs_depth(smk.input[0], smk.output[f"{reference}_raw"], reference, raw)
        distance_average(smk.input[0], smk.output.average, metric)


def plot_distance_steps(smk) -> None:
    from .plots import distance_vs_step

    with _logged(smk) as log:
        for reference in ("init", "previous"):
            distance_vs_step(smk.input[0], smk.output[reference], reference, smk.params.metric)
            log.info("%s: %s (%s)", reference, smk.output[reference], smk.params.metric)


def plot_gradients(smk) -> None:
    from .plots import gradient_vs_depth

    with _logged(smk):
        gradient_vs_depth(smk.input[0], smk.output[0], smk.params.vanish, smk.params.explode)


def accuracy_table(smk) -> None:
    from .tables import accuracy_table as table

    with _logged(smk) as log:
        df = table(smk.input[0], smk.output.parquet, smk.output.markdown)
        log.info("%d settings", len(df))


def plot_history(smk) -> None:
    from .plots import history_curves

    with _logged(smk):
        history_curves(smk.input[0], smk.output.accuracy, "accuracy")
        history_curves(smk.input[0], smk.output.loss, "loss")


def features(smk) -> None:
    from .features import run_features

    with _logged(smk) as log:
        path = run_features(
            Path(smk.input.run_json).parent,
            smk.input.dataset,
            smk.output[0],
            probe_size=smk.params.probe_size,
            probe_seed=smk.params.probe_seed,
            device="cpu",  # a small job: it takes no GPU from the training jobs
        )
        log.info("features of %s: %s", smk.wildcards.run_id, path)


def similarity(smk) -> None:
    from .features import study_similarity

    with _logged(smk) as log:
        files = {Path(p).parent.name: p for p in smk.input}
        df = study_similarity(files, smk.params.pairs, smk.output[0], unbiased=smk.params.unbiased)
        log.info("%d similarity rows over %d runs", len(df), len(files))


def perturbation(smk) -> None:
    from .perturb import branch_table

    with _logged(smk):
        branch_table(Path(smk.input.source).parent, Path(smk.input.run_json).parent, smk.output[0])


def plot_similarity(smk) -> None:
    from .features import load_features
    from .plots import cka_heatmap, correlation_heatmap

    with _logged(smk):
        cka_heatmap(smk.input.table, smk.output.cka)
        X, meta = load_features(smk.input.example)
        correlation_heatmap(
            X.numpy(), smk.output.correlation, f"feature correlations: {meta['run_id']}"
        )


def plot_perturbations(smk) -> None:
    from .plots import perturbation_bars

    with _logged(smk):
        perturbation_bars(smk.input[0], smk.output[0])


def plot_dynamics(smk) -> None:
    from .plots import change_by_setting, frozen_shares

    with _logged(smk):
        frozen_shares(smk.input.frozen, smk.output.frozen)
        change_by_setting(smk.input.distances, smk.output.change)


def findings(smk) -> None:
    from .findings import findings as test_claims
    from .findings import write_findings

    with _logged(smk) as log:
        study = smk.wildcards.study
        paths = dict(smk.input.items())
        df = test_claims(
            smk.params.claims,
            paths,
            study=study,
            models=smk.params.models,
            min_accuracy=smk.params.min_accuracy,
            expect_failure=smk.params.expect_failure,
        )
        write_findings(df, smk.output.parquet, smk.output.markdown, study)
        for kind, rows in df.groupby("kind"):
            log.info("%s: %s", kind, rows["verdict"].value_counts().to_dict())


def interpolate(smk) -> None:
    from .basins import pair_analysis

    with _logged(smk) as log:
        pair = dict(smk.params.pair)
        ends = [pair[k] for k in ("run_a", "end_a", "run_b", "end_b")]
        log.info("pair %s (%s): %s/%s -> %s/%s", pair["pair"], pair["kind"], *ends)
        pair_analysis(
            pair,
            Path(smk.input.run_a).parent,
            Path(smk.input.run_b).parent,
            smk.input.dataset,
            dict(smk.params.settings),
            smk.output.path,
            smk.output.distances,
            device=smk.config.get("device", "auto"),
        )


def plot_barriers(smk) -> None:
    from .basin_plots import plot_all

    with _logged(smk):
        plot_all(smk.input.barriers, smk.input.pair_distances, dict(smk.output.items()))


def analysis(smk) -> None:
    """Rules curvature, spectra and layer_grams: the registered analysis of one run."""
    from .analyses import ANALYSES, RULE_ANALYSIS
    from .runs import FinishedRun

    with _logged(smk) as log:
        name = RULE_ANALYSIS[smk.rule]
        entry = ANALYSES[name]
        options = {**entry.defaults, **dict(smk.params.options)}
        run = FinishedRun.read(smk.input.run_json)
        df = entry.function(
            run,
            smk.input.dataset,
            options,
            *list(smk.output),
            keep_steps=smk.params.keep_steps,
            device="cpu",  # small jobs: they take no GPU from the training jobs
        )
        log.info("%s of %s: %d rows", name, run.run_id, len(df))


def layer_similarity(smk) -> None:
    from .analyses import study_layer_similarity

    with _logged(smk) as log:
        grams = {Path(p).parent.name: p for p in smk.input.grams}
        pairs = [tuple(p) for p in smk.params.pairs]
        df = study_layer_similarity(
            grams, list(smk.input.tables), pairs, smk.output[0], unbiased=smk.params.unbiased
        )
        log.info("%d layer similarity rows, %d pairs", len(df), len(pairs))


def plot_analysis(smk) -> None:
    from .analysis_plots import FIGURES

    with _logged(smk):
        FIGURES[smk.wildcards.figure](smk.input[0], smk.output[0])
