# One training job per grid point (model x dataset x init x optimizer x seed).


rule train:
    input:
        unpack(train_inputs),
    output:
        run_json=paths.run_file(paths.RUN_JSON),
        history=paths.run_file("history.parquet"),
        gradients=paths.run_file("gradients.parquet"),
        checkpoints=directory(paths.run_file(paths.CHECKPOINTS)),
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
        work_dir=paths.work_dir(),
        code=code_hash(
            "train",
            "gradients",
            "reach_kernels",
            "resume",
            "data",
            "models",
            "inits",
            "perturb",
            "checkpoints",
            "tables",
            "columns",
            "runs",
            "jobs:train",
        ),
    script:
        "../scripts/train.py"
