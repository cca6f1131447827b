# Distances from checkpoints only, per run, then one table per study.


rule distances:
    input:
        run_json=f"{RUN_DIR}/run.json",
        checkpoints=f"{RUN_DIR}/checkpoints",
    output:
        f"{RUN_DIR}/distances.parquet",
    params:
        code=code_hash("measures", "checkpoints", "tables", "jobs"),
    log:
        "results/{study}/logs/distances/{run_id}.log",
    benchmark:
        "results/{study}/benchmarks/distances/{run_id}.tsv"
    conda:
        ENV
    script:
        "../scripts/distances.py"


rule aggregate:
    input:
        lambda w: run_paths(w.study, f"{w.table}.parquet"),
    output:
        "results/{study}/{table}.parquet",
    params:
        code=code_hash("tables", "jobs"),
    wildcard_constraints:
        table="distances|history",
    log:
        "results/{study}/logs/aggregate/{table}.log",
    benchmark:
        "results/{study}/benchmarks/aggregate/{table}.tsv"
    conda:
        ENV
    script:
        "../scripts/aggregate.py"
