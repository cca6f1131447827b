# Same basin or not: each interpolation pair of a study (two checkpoints) evaluated along the
# straight path between them, as trained and permutation-aligned; then one table per study.


rule interpolate:
    input:
        unpack(pair_inputs),
    output:
        path=paths.pair_file("path.parquet"),
        distances=paths.pair_file("distances.parquet"),
    log:
        "results/{study}/logs/interpolate/{pair}.log",
    benchmark:
        "results/{study}/benchmarks/interpolate/{pair}.tsv"
    conda:
        ENV
    threads: config["train_threads"]
    params:
        pair=lambda w: interpolation_pair(w),
        settings=lambda w: STUDIES[w.study].interpolation,
        code=code_hash(
            "basins",
            "interpolate",
            "alignment",
            "measures",
            "data",
            "models",
            "checkpoints",
            "features",
            "loaders",
            "devices",
            "runs",
            "tables",
            "columns",
            "jobs:interpolate",
        ),
    script:
        "../scripts/interpolate.py"


rule aggregate_pairs:
    input:
        barriers=lambda w: pair_paths(w.study, "path.parquet"),
        pair_distances=lambda w: pair_paths(w.study, "distances.parquet"),
    output:
        barriers=paths.study_table("barriers"),
        pair_distances=paths.study_table("pair_distances"),
    log:
        "results/{study}/logs/aggregate_pairs.log",
    benchmark:
        "results/{study}/benchmarks/aggregate_pairs.tsv"
    conda:
        ENV
    params:
        code=code_hash("tables", "columns", "jobs:aggregate"),
    script:
        "../scripts/aggregate.py"


rule plot_barriers:
    input:
        barriers=paths.study_table("barriers"),
        pair_distances=paths.study_table("pair_distances"),
    output:
        **{
            name: report(
                paths.figure(name),
                caption=f"../report/{name}.rst",
                category="{study}",
                subcategory="same basin",
            )
            for name in BARRIER_FIGURES
        },
    log:
        "results/{study}/logs/plot_barriers.log",
    benchmark:
        "results/{study}/benchmarks/plot_barriers.tsv"
    conda:
        ENV
    params:
        code=code_hash(
            "basin_plots", "plots", "tables", "columns", "jobs:plot_barriers"
        ),
    script:
        "../scripts/plot_barriers.py"
