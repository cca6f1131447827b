# Distances from checkpoints only, per run, then one table per study.


rule distances:
    input:
        run_json=f"{RUN_DIR}/run.json",
        checkpoints=f"{RUN_DIR}/checkpoints",
    output:
        distances=f"{RUN_DIR}/distances.parquet",
        frozen=f"{RUN_DIR}/frozen.parquet",
    log:
        "results/{study}/logs/distances/{run_id}.log",
    benchmark:
        "results/{study}/benchmarks/distances/{run_id}.tsv"
    conda:
        ENV
    params:
        keep_steps=lambda w: STUDIES[w.study].keep_step_checkpoints,
        work_dir="results/.work/{study}/{run_id}",
        code=code_hash("measures", "checkpoints", "tables", "jobs:distances"),
    script:
        "../scripts/distances.py"


rule aggregate:
    input:
        **{t: lambda w, t=t: run_paths(w.study, f"{t}.parquet") for t in RUN_TABLES},
    output:
        **{t: f"results/{{study}}/{t}.parquet" for t in RUN_TABLES},
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
        code=code_hash("tables", "jobs:aggregate"),
    script:
        "../scripts/aggregate.py"


rule aggregate_perturbations:
    input:
        perturbations=branch_tables,
    output:
        perturbations="results/{study}/perturbations.parquet",
    log:
        "results/{study}/logs/aggregate_perturbations.log",
    benchmark:
        "results/{study}/benchmarks/aggregate_perturbations.tsv"
    conda:
        ENV
    params:
        code=code_hash("tables", "jobs:aggregate"),
    script:
        "../scripts/aggregate.py"
