# Claims as outputs: each claim of a study's config (its original document's statements)
# tested on the study's tables; the verdicts and the training check (paramdyn.findings).


rule findings:
    input:
        unpack(findings_inputs),
    output:
        parquet=paths.study_table("findings"),
        markdown=report(
            paths.study_file("findings.md"),
            caption="../report/findings.rst",
            category=FINDINGS_CATEGORY,
            subcategory="{study}",
        ),
    log:
        "results/{study}/logs/findings.log",
    benchmark:
        "results/{study}/benchmarks/findings.tsv"
    conda:
        ENV
    params:
        claims=lambda w: list(STUDIES[w.study].claims),
        min_accuracy=lambda w: STUDIES[w.study].min_accuracy,
        expect_failure=lambda w: list(STUDIES[w.study].expect_failure),
        models=lambda w: {r.model: r.model_name for r in STUDIES[w.study].runs.values()},
        code=code_hash("findings", "tables", "columns", "jobs:findings"),
    script:
        "../scripts/findings.py"
