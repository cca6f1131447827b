# Features of every final model on a fixed probe set, their similarity across runs, and the
# perturb-and-retrain branches compared with their originals.


rule features:
    input:
        run_json=f"{RUN_DIR}/run.json",
        checkpoints=f"{RUN_DIR}/checkpoints",
        dataset=lambda w: f"results/datasets/{run_spec(w).dataset}.safetensors",
    output:
        f"{RUN_DIR}/features.safetensors",
    log:
        "results/{study}/logs/features/{run_id}.log",
    benchmark:
        "results/{study}/benchmarks/features/{run_id}.tsv"
    conda:
        ENV
    params:
        probe_size=lambda w: STUDIES[w.study].features["probe_size"],
        probe_seed=lambda w: STUDIES[w.study].features["probe_seed"],
        code=code_hash("features", "models", "data", "checkpoints", "jobs:features"),
    script:
        "../scripts/features.py"


rule similarity:
    input:
        similarity_inputs,
    output:
        "results/{study}/similarity.parquet",
    log:
        "results/{study}/logs/similarity.log",
    benchmark:
        "results/{study}/benchmarks/similarity.tsv"
    conda:
        ENV
    params:
        pairs=lambda w: STUDIES[w.study].similarity_pairs,
        unbiased=lambda w: STUDIES[w.study].features["unbiased"],
        code=code_hash("features", "tables", "jobs:similarity"),
    script:
        "../scripts/similarity.py"


rule perturbation:
    input:
        run_json=f"{RUN_DIR}/run.json",
        checkpoints=f"{RUN_DIR}/checkpoints",
        source=source_run_json,
    output:
        f"{RUN_DIR}/perturbation.parquet",
    log:
        "results/{study}/logs/perturbation/{run_id}.log",
    benchmark:
        "results/{study}/benchmarks/perturbation/{run_id}.tsv"
    conda:
        ENV
    params:
        code=code_hash("perturb", "checkpoints", "tables", "jobs:perturbation"),
    script:
        "../scripts/perturbation.py"


rule plot_similarity:
    input:
        table="results/{study}/similarity.parquet",
        example=lambda w: similarity_inputs(w)[0],
    output:
        cka=report(
            "results/{study}/figures/cka.png",
            caption="../report/cka.rst",
            category="{study}",
            subcategory="features",
        ),
        correlation=report(
            "results/{study}/figures/feature_correlation.png",
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
        code=code_hash("plots", "features", "tables", "jobs:plot_similarity"),
    script:
        "../scripts/plot_similarity.py"


rule plot_perturbations:
    input:
        "results/{study}/perturbations.parquet",
    output:
        report(
            "results/{study}/figures/perturbations.png",
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
        code=code_hash("plots", "tables", "jobs:plot_perturbations"),
    script:
        "../scripts/plot_perturbations.py"
