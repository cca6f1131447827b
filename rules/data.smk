# Datasets: fetched on the submit host (compute nodes often have no internet), then prepared
# once into a compact uint8 file that training loads whole.


localrules:
    download_dataset,


rule download_dataset:
    output:
        "results/datasets/{dataset}.download.json",
    params:
        data_dir=DATA_DIR,
        code=code_hash("data", "jobs"),
    log:
        "results/logs/download_dataset/{dataset}.log",
    benchmark:
        "results/benchmarks/download_dataset/{dataset}.tsv"
    conda:
        ENV
    wildcard_constraints:
        dataset="|".join(
            n for n, d in catalog.DATASETS.items() if d.source == "torchvision"
        ),
    script:
        "../scripts/download_dataset.py"


def download_marker(wildcards):
    if catalog.DATASETS[wildcards.dataset].source == "torchvision":
        return [f"results/datasets/{wildcards.dataset}.download.json"]
    return []


rule prepare_dataset:
    input:
        download_marker,
    output:
        "results/datasets/{dataset}.safetensors",
    params:
        data_dir=DATA_DIR,
        spec=lambda w: asdict(catalog.DATASETS[w.dataset]),
        code=code_hash("data", "jobs"),
    log:
        "results/logs/prepare_dataset/{dataset}.log",
    benchmark:
        "results/benchmarks/prepare_dataset/{dataset}.tsv"
    conda:
        ENV
    script:
        "../scripts/prepare_dataset.py"
