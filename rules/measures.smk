# Distances from checkpoints only, per run, then one table per study.


rule distances:
    input:
        run_json=paths.run_file(paths.RUN_JSON),
        checkpoints=paths.run_file(paths.CHECKPOINTS),
    output:
        distances=paths.run_file("distances.parquet"),
        frozen=paths.run_file("frozen.parquet"),
    log:
        "results/{study}/logs/distances/{run_id}.log",
    benchmark:
        "results/{study}/benchmarks/distances/{run_id}.tsv"
    conda:
        ENV
    params:
        keep_steps=lambda w: STUDIES[w.study].keep_step_checkpoints,
        work_dir=paths.work_dir(),
        code=code_hash(
            "measures", "checkpoints", "tables", "columns", "runs", "jobs:distances"
        ),
    script:
        "../scripts/distances.py"


rule aggregate:
    input:
        **{t: lambda w, t=t: run_paths(w.study, f"{t}.parquet") for t in RUN_TABLES},
    output:
        **{t: paths.study_table(t) for t in RUN_TABLES},
    log:
        "results/{study}/logs/aggregate.log",
    benchmark:
        "results/{study}/benchmarks/aggregate.tsv"
    conda:
        ENV
    params:
        gradient_flags=lambda w: {
            k: STUDIES[w.study].gradients[k] for k in ("vanish_below", "explode_above")
        },
        code=code_hash("tables", "columns", "jobs:aggregate"),
    script:
        "../scripts/aggregate.py"


rule aggregate_perturbations:
    input:
        perturbations=branch_tables,
    output:
        perturbations=paths.study_table("perturbations"),
    log:
        "results/{study}/logs/aggregate_perturbations.log",
    benchmark:
        "results/{study}/benchmarks/aggregate_perturbations.tsv"
    conda:
        ENV
    params:
        code=code_hash("tables", "columns", "jobs:aggregate"),
    script:
        "../scripts/aggregate.py"
