# Datasets: fetched on the submit host (compute nodes often have no internet), then prepared
# once into a compact uint8 file that training loads whole.


localrules:
    download_dataset,


rule download_dataset:
    output:
        paths.download_marker(),
    log:
        "results/logs/download_dataset/{dataset}.log",
    benchmark:
        "results/benchmarks/download_dataset/{dataset}.tsv"
    wildcard_constraints:
        dataset="|".join(
            n for n, d in catalog.DATASETS.items() if d.source == "torchvision"
        ),
    conda:
        ENV
    params:
        data_dir=DATA_DIR,
        allow_download=config["download"],
        code=code_hash("data", "checkpoints", "jobs:download_dataset"),
    script:
        "../scripts/download_dataset.py"


rule prepare_dataset:
    input:
        download_marker,
    output:
        paths.dataset_file(),
    log:
        "results/logs/prepare_dataset/{dataset}.log",
    benchmark:
        "results/benchmarks/prepare_dataset/{dataset}.tsv"
    conda:
        ENV
    params:
        data_dir=DATA_DIR,
        spec=lambda w: asdict(catalog.DATASETS[w.dataset]),
        code=code_hash("data", "checkpoints", "jobs:prepare_dataset"),
    script:
        "../scripts/prepare_dataset.py"
