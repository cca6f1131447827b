# One training job per grid point (model x dataset x init x optimizer x seed).


rule train:
    input:
        unpack(train_inputs),
    output:
        run_json=f"{RUN_DIR}/run.json",
        history=f"{RUN_DIR}/history.parquet",
        gradients=f"{RUN_DIR}/gradients.parquet",
        checkpoints=directory(f"{RUN_DIR}/checkpoints"),
    log:
        "results/{study}/logs/train/{run_id}.log",
    benchmark:
        "results/{study}/benchmarks/train/{run_id}.tsv"
    conda:
        ENV
    threads: config["train_threads"]
    resources:
        gpu=GPU_PER_TRAIN,
    params:
        # every hyper-parameter of the run, and the model's fixed options: a change reruns it
        hparams=lambda w: run_spec(w).to_json(),
        model=lambda w: catalog.MODELS[run_spec(w).model_name].options,
        # where the run trains (snapshots for resuming): outside the declared outputs
        work_dir="results/.work/{study}/{run_id}",
        code=code_hash(
            "train",
            "gradients",
            "resume",
            "data",
            "models",
            "inits",
            "perturb",
            "checkpoints",
            "tables",
            "jobs:train",
        ),
    script:
        "../scripts/train.py"
