# Figures, from the per-study tables only.


rule plot_distances:
    input:
        paths.study_table("distances"),
    output:
        **{
            name: report(
                paths.figure(f"distance_vs_depth_{name}"),
                caption=f"../report/distance_vs_depth_{name}.rst",
                category="{study}",
                subcategory="distances",
            )
            for name in DISTANCE_FIGURES
        },
    log:
        "results/{study}/logs/plot_distances.log",
    benchmark:
        "results/{study}/benchmarks/plot_distances.tsv"
    conda:
        ENV
    params:
        metric=lambda w: STUDIES[w.study].figures["metric"],
        code=code_hash("plots", "tables", "columns", "jobs:plot_distances"),
    script:
        "../scripts/plot_distances.py"


# The depth study's main figure: block distance against training step, one line per block.
rule plot_distance_steps:
    input:
        paths.study_table("distances"),
    output:
        **{
            name: report(
                paths.figure(f"distance_vs_step_{name}"),
                caption=f"../report/distance_vs_step_{name}.rst",
                category="{study}",
                subcategory="distances",
            )
            for name in STEP_FIGURES
        },
    log:
        "results/{study}/logs/plot_distance_steps.log",
    benchmark:
        "results/{study}/benchmarks/plot_distance_steps.tsv"
    conda:
        ENV
    params:
        metric=lambda w: STUDIES[w.study].figures["metric"],
        code=code_hash("plots", "tables", "columns", "jobs:plot_distance_steps"),
    script:
        "../scripts/plot_distance_steps.py"


rule plot_gradients:
    input:
        paths.study_table("gradients"),
    output:
        report(
            paths.figure("gradients_vs_depth"),
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
        code=code_hash("plots", "tables", "columns", "jobs:plot_gradients"),
    script:
        "../scripts/plot_gradients.py"


rule accuracy_table:
    input:
        paths.study_table("history"),
    output:
        parquet=paths.study_table("accuracy"),
        markdown=report(
            paths.study_file("accuracy.md"),
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
        code=code_hash("tables", "columns", "jobs:accuracy_table"),
    script:
        "../scripts/accuracy_table.py"


rule plot_history:
    input:
        paths.study_table("history"),
    output:
        accuracy=report(
            paths.figure("accuracy"),
            caption="../report/history.rst",
            category="{study}",
            subcategory="training",
        ),
        loss=report(
            paths.figure("loss"),
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
        code=code_hash("plots", "tables", "columns", "jobs:plot_history"),
    script:
        "../scripts/plot_history.py"


rule plot_dynamics:
    input:
        frozen=paths.study_table("frozen"),
        distances=paths.study_table("distances"),
    output:
        frozen=report(
            paths.figure("frozen"),
            caption="../report/frozen.rst",
            category="{study}",
            subcategory="dynamics",
        ),
        change=report(
            paths.figure("change"),
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
        code=code_hash("plots", "tables", "columns", "jobs:plot_dynamics"),
    script:
        "../scripts/plot_dynamics.py"
