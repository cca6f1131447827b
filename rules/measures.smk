# Distances from checkpoints only, per run, then one table per study.


rule distances:
    input:
        run_json=f"{RUN_DIR}/run.json",
        checkpoints=f"{RUN_DIR}/checkpoints",
    output:
        f"{RUN_DIR}/distances.parquet",
    log:
        "results/{study}/logs/distances/{run_id}.log",
    benchmark:
        "results/{study}/benchmarks/distances/{run_id}.tsv"
    conda:
        ENV
    params:
        keep_steps=lambda w: STUDIES[w.study].keep_step_checkpoints,
        work_dir="results/.work/{study}/{run_id}",
        code=code_hash("measures", "checkpoints", "tables", "jobs"),
    script:
        "../scripts/distances.py"


rule aggregate:
    input:
        run_tables,
    output:
        "results/{study}/{table}.parquet",
    log:
        "results/{study}/logs/aggregate/{table}.log",
    benchmark:
        "results/{study}/benchmarks/aggregate/{table}.tsv"
    wildcard_constraints:
        table="distances|history|gradients|perturbations",
    conda:
        ENV
    params:
        code=code_hash("tables", "jobs"),
    script:
        "../scripts/aggregate.py"
