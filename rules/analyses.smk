# Offline analyses of the runs' checkpoints (paramdyn.analyses; README "Offline analyses"):
# one rule per measure family per run, one table per study, one figure rule per analysis.
# Each runs only for the runs an enabled analysis of the study reads (analysis_runs). The
# per-run rules share one job (jobs.analysis, through the registry), so one code list.


rule curvature:
    input:
        unpack(analysis_inputs),
    output:
        paths.run_file("curvature.parquet"),
    log:
        "results/{study}/logs/curvature/{run_id}.log",
    benchmark:
        "results/{study}/benchmarks/curvature/{run_id}.tsv"
    conda:
        ENV
    params:
        options=lambda w: analysis_options(w.study, "curvature"),
        keep_steps=lambda w: STUDIES[w.study].keep_step_checkpoints,
        code=code_hash(
            "analyses",
            "curvature",
            "spectra",
            "layer_similarity",
            "features",
            "loaders",
            "checkpoints",
            "data",
            "models",
            "tables",
            "columns",
            "runs",
            "jobs:analysis",
        ),
    script:
        "../scripts/analysis.py"


rule spectra:
    input:
        unpack(analysis_inputs),
    output:
        paths.run_file("spectra.parquet"),
    log:
        "results/{study}/logs/spectra/{run_id}.log",
    benchmark:
        "results/{study}/benchmarks/spectra/{run_id}.tsv"
    conda:
        ENV
    params:
        options=lambda w: analysis_options(w.study, "spectra"),
        keep_steps=lambda w: STUDIES[w.study].keep_step_checkpoints,
        code=code_hash(
            "analyses",
            "curvature",
            "spectra",
            "layer_similarity",
            "features",
            "loaders",
            "checkpoints",
            "data",
            "models",
            "tables",
            "columns",
            "runs",
            "jobs:analysis",
        ),
    script:
        "../scripts/analysis.py"


rule layer_grams:
    input:
        unpack(analysis_inputs),
    output:
        grams=paths.run_file("grams.safetensors"),
        table=paths.run_file("layer_cka.parquet"),
    log:
        "results/{study}/logs/layer_grams/{run_id}.log",
    benchmark:
        "results/{study}/benchmarks/layer_grams/{run_id}.tsv"
    conda:
        ENV
    params:
        options=lambda w: analysis_options(w.study, "layer_similarity"),
        keep_steps=lambda w: STUDIES[w.study].keep_step_checkpoints,
        code=code_hash(
            "analyses",
            "curvature",
            "spectra",
            "layer_similarity",
            "features",
            "loaders",
            "checkpoints",
            "data",
            "models",
            "tables",
            "columns",
            "runs",
            "jobs:analysis",
        ),
    script:
        "../scripts/analysis.py"


rule aggregate_curvature:
    input:
        curvature=lambda w: analysis_tables(w.study, "curvature", "curvature.parquet"),
    output:
        curvature=paths.study_table("curvature"),
    log:
        "results/{study}/logs/aggregate_curvature.log",
    benchmark:
        "results/{study}/benchmarks/aggregate_curvature.tsv"
    conda:
        ENV
    params:
        code=code_hash("tables", "columns", "jobs:aggregate"),
    script:
        "../scripts/aggregate.py"


rule aggregate_spectra:
    input:
        spectra=lambda w: analysis_tables(w.study, "spectra", "spectra.parquet"),
    output:
        spectra=paths.study_table("spectra"),
    log:
        "results/{study}/logs/aggregate_spectra.log",
    benchmark:
        "results/{study}/benchmarks/aggregate_spectra.tsv"
    conda:
        ENV
    params:
        code=code_hash("tables", "columns", "jobs:aggregate"),
    script:
        "../scripts/aggregate.py"


rule layer_similarity:
    input:
        grams=lambda w: analysis_tables(
            w.study, "layer_similarity", "grams.safetensors"
        ),
        tables=lambda w: analysis_tables(
            w.study, "layer_similarity", "layer_cka.parquet"
        ),
    output:
        paths.study_table("layer_similarity"),
    log:
        "results/{study}/logs/layer_similarity.log",
    benchmark:
        "results/{study}/benchmarks/layer_similarity.tsv"
    conda:
        ENV
    params:
        pairs=lambda w: layer_similarity_pairs(w.study),
        unbiased=lambda w: analysis_options(w.study, "layer_similarity")["unbiased"],
        code=code_hash(
            "analyses",
            "curvature",
            "spectra",
            "layer_similarity",
            "features",
            "loaders",
            "checkpoints",
            "data",
            "models",
            "tables",
            "columns",
            "runs",
            "jobs:layer_similarity",
        ),
    script:
        "../scripts/layer_similarity.py"


rule plot_analysis:
    input:
        lambda w: paths.study_table(FIGURE_ANALYSIS[w.figure], w.study),
    output:
        report(
            paths.figure("{figure}"),
            caption="../report/analyses.rst",
            category="{study}",
            subcategory="analyses",
        ),
    log:
        "results/{study}/logs/plot_analysis/{figure}.log",
    benchmark:
        "results/{study}/benchmarks/plot_analysis/{figure}.tsv"
    wildcard_constraints:
        figure="|".join(f for figs in ANALYSIS_FIGURES.values() for f in figs),
    conda:
        ENV
    params:
        code=code_hash(
            "analysis_plots", "plots", "tables", "columns", "jobs:plot_analysis"
        ),
    script:
        "../scripts/plot_analysis.py"
