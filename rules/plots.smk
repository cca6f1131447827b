# Figures, from the per-study tables only.


rule plot_distances:
    input:
        "results/{study}/distances.parquet",
    output:
        init=report(
            "results/{study}/figures/distance_vs_depth_init.png",
            caption="../report/distance_vs_depth.rst",
            category="{study}",
            subcategory="distances",
        ),
        previous=report(
            "results/{study}/figures/distance_vs_depth_previous.png",
            caption="../report/distance_vs_depth.rst",
            category="{study}",
            subcategory="distances",
        ),
    log:
        "results/{study}/logs/plot_distances.log",
    benchmark:
        "results/{study}/benchmarks/plot_distances.tsv"
    conda:
        ENV
    params:
        metric=lambda w: STUDIES[w.study].figures["metric"],
        code=code_hash("plots", "tables", "jobs"),
    script:
        "../scripts/plot_distances.py"


rule plot_history:
    input:
        "results/{study}/history.parquet",
    output:
        accuracy=report(
            "results/{study}/figures/accuracy.png",
            caption="../report/history.rst",
            category="{study}",
            subcategory="training",
        ),
        loss=report(
            "results/{study}/figures/loss.png",
            caption="../report/history.rst",
            category="{study}",
            subcategory="training",
        ),
    log:
        "results/{study}/logs/plot_history.log",
    benchmark:
        "results/{study}/benchmarks/plot_history.tsv"
    conda:
        ENV
    params:
        code=code_hash("plots", "tables", "jobs"),
    script:
        "../scripts/plot_history.py"
