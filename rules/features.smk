# Features of every final model on a fixed probe set, their similarity across runs, and the
# perturb-and-retrain branches compared with their originals.


rule features:
    input:
        run_json=paths.run_file(paths.RUN_JSON),
        checkpoints=paths.run_file(paths.CHECKPOINTS),
        dataset=lambda w: paths.dataset_file(run_spec(w).dataset),
    output:
        paths.run_file("features.safetensors"),
    log:
        "results/{study}/logs/features/{run_id}.log",
    benchmark:
        "results/{study}/benchmarks/features/{run_id}.tsv"
    conda:
        ENV
    params:
        probe_size=lambda w: STUDIES[w.study].features["probe_size"],
        probe_seed=lambda w: STUDIES[w.study].features["probe_seed"],
        code=code_hash(
            "features",
            "loaders",
            "models",
            "data",
            "checkpoints",
            "columns",
            "runs",
            "tables",
            "jobs:features",
        ),
    script:
        "../scripts/features.py"


rule similarity:
    input:
        similarity_inputs,
    output:
        paths.study_table("similarity"),
    log:
        "results/{study}/logs/similarity.log",
    benchmark:
        "results/{study}/benchmarks/similarity.tsv"
    conda:
        ENV
    params:
        pairs=lambda w: STUDIES[w.study].similarity_pairs,
        unbiased=lambda w: STUDIES[w.study].features["unbiased"],
        code=code_hash(
            "features", "tables", "checkpoints", "columns", "runs", "jobs:similarity"
        ),
    script:
        "../scripts/similarity.py"


rule perturbation:
    input:
        run_json=paths.run_file(paths.RUN_JSON),
        checkpoints=paths.run_file(paths.CHECKPOINTS),
        source=source_run_json,
    output:
        paths.run_file("perturbation.parquet"),
    log:
        "results/{study}/logs/perturbation/{run_id}.log",
    benchmark:
        "results/{study}/benchmarks/perturbation/{run_id}.tsv"
    conda:
        ENV
    params:
        code=code_hash(
            "perturb",
            "checkpoints",
            "tables",
            "columns",
            "measures",
            "runs",
            "jobs:perturbation",
        ),
    script:
        "../scripts/perturbation.py"


rule plot_similarity:
    input:
        table=paths.study_table("similarity"),
        example=lambda w: similarity_inputs(w)[0],
    output:
        cka=report(
            paths.figure("cka"),
            caption="../report/cka.rst",
            category="{study}",
            subcategory="features",
        ),
        correlation=report(
            paths.figure("feature_correlation"),
            caption="../report/feature_correlation.rst",
            category="{study}",
            subcategory="features",
        ),
    log:
        "results/{study}/logs/plot_similarity.log",
    benchmark:
        "results/{study}/benchmarks/plot_similarity.tsv"
    conda:
        ENV
    params:
        code=code_hash(
            "plots",
            "features",
            "tables",
            "checkpoints",
            "columns",
            "runs",
            "jobs:plot_similarity",
        ),
    script:
        "../scripts/plot_similarity.py"


rule plot_perturbations:
    input:
        paths.study_table("perturbations"),
    output:
        report(
            paths.figure("perturbations"),
            caption="../report/perturbations.rst",
            category="{study}",
            subcategory="perturbations",
        ),
    log:
        "results/{study}/logs/plot_perturbations.log",
    benchmark:
        "results/{study}/benchmarks/plot_perturbations.tsv"
    conda:
        ENV
    params:
        code=code_hash("plots", "tables", "columns", "jobs:plot_perturbations"),
    script:
        "../scripts/plot_perturbations.py"
