# Figures, from the per-study tables only.


rule plot_distances:
    input:
        "results/{study}/distances.parquet",
    output:
        **{
            name: report(
                f"results/{{study}}/figures/distance_vs_depth_{name}.png",
                caption=f"../report/distance_vs_depth_{name}.rst",
                category="{study}",
                subcategory="distances",
            )
            for name in ("init", "previous", "init_raw", "previous_raw", "average")
        },
    log:
        "results/{study}/logs/plot_distances.log",
    benchmark:
        "results/{study}/benchmarks/plot_distances.tsv"
    conda:
        ENV
    params:
        metric=lambda w: STUDIES[w.study].figures["metric"],
        code=code_hash("plots", "tables", "jobs:plot_distances"),
    script:
        "../scripts/plot_distances.py"


# The depth study's main figure: block distance against training step, one line per block.
rule plot_distance_steps:
    input:
        "results/{study}/distances.parquet",
    output:
        **{
            name: report(
                f"results/{{study}}/figures/distance_vs_step_{name}.png",
                caption=f"../report/distance_vs_step_{name}.rst",
                category="{study}",
                subcategory="distances",
            )
            for name in ("init", "previous")
        },
    log:
        "results/{study}/logs/plot_distance_steps.log",
    benchmark:
        "results/{study}/benchmarks/plot_distance_steps.tsv"
    conda:
        ENV
    params:
        metric=lambda w: STUDIES[w.study].figures["metric"],
        code=code_hash("plots", "tables", "jobs:plot_distance_steps"),
    script:
        "../scripts/plot_distance_steps.py"


rule plot_gradients:
    input:
        "results/{study}/gradients.parquet",
    output:
        report(
            "results/{study}/figures/gradients_vs_depth.png",
            caption="../report/gradients.rst",
            category="{study}",
            subcategory="gradients",
        ),
    log:
        "results/{study}/logs/plot_gradients.log",
    benchmark:
        "results/{study}/benchmarks/plot_gradients.tsv"
    conda:
        ENV
    params:
        vanish=lambda w: STUDIES[w.study].gradients["vanish_below"],
        explode=lambda w: STUDIES[w.study].gradients["explode_above"],
        code=code_hash("plots", "tables", "jobs:plot_gradients"),
    script:
        "../scripts/plot_gradients.py"


rule accuracy_table:
    input:
        "results/{study}/history.parquet",
    output:
        parquet="results/{study}/accuracy.parquet",
        markdown=report(
            "results/{study}/accuracy.md",
            caption="../report/accuracy.rst",
            category="{study}",
            subcategory="training",
        ),
    log:
        "results/{study}/logs/accuracy_table.log",
    benchmark:
        "results/{study}/benchmarks/accuracy_table.tsv"
    conda:
        ENV
    params:
        code=code_hash("tables", "jobs:accuracy_table"),
    script:
        "../scripts/accuracy_table.py"


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
        code=code_hash("plots", "tables", "jobs:plot_history"),
    script:
        "../scripts/plot_history.py"


rule plot_dynamics:
    input:
        frozen="results/{study}/frozen.parquet",
        distances="results/{study}/distances.parquet",
    output:
        frozen=report(
            "results/{study}/figures/frozen.png",
            caption="../report/frozen.rst",
            category="{study}",
            subcategory="dynamics",
        ),
        change=report(
            "results/{study}/figures/change.png",
            caption="../report/change.rst",
            category="{study}",
            subcategory="dynamics",
        ),
    log:
        "results/{study}/logs/plot_dynamics.log",
    benchmark:
        "results/{study}/benchmarks/plot_dynamics.tsv"
    conda:
        ENV
    params:
        code=code_hash("plots", "tables", "jobs:plot_dynamics"),
    script:
        "../scripts/plot_dynamics.py"
