"""Validate a config and expand each study's grid into runs.

Light on purpose (no torch): the Snakefile calls :func:`load_studies` while it parses, so a
bad config stops before a single job starts. Types and keys are checked by the JSON schema
(through ``snakemake.utils.validate``); names and cross-field rules by the code below.

A run's ``seed`` seeds its init; its data order and augmentation follow it unless the study
gives ``data_seeds`` (an axis of its own). A perturbation entry branches each run it selects
from its final weights or a chosen checkpoint (``at_step``/``at_epoch``), once per value of
each option given as a list and per data seed; the ids name only what an entry varies, so
the runs of a config that uses none of this keep their ids and keys (nothing retrains). The
pairs a study compares (``similarity_pairs``) or interpolates between
(``interpolation_pairs``) are derived from the runs here too, torch-free.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import catalog, columns
from .perturb import PERTURBATION_OPTIONS, validate_perturbation

DEFAULT_SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "config.schema.yaml"


MODEL_SETTINGS = ("width", "depth", "norm")  # keys of a model entry that change the model
INIT_ENTRY_KEYS = ("name", "label", "run")  # keys of an init entry that are not init options

# RunSpec fields added after runs were first keyed: left out of the run's JSON (its key)
# while empty (or None: 0 is a valid data seed and branching step), so the runs of configs
# that do not use them keep their key and do not retrain
_OMITTED_WHEN_EMPTY = ("init_options", "inputs")
_OMITTED_WHEN_NONE = ("data_seed", "branch_step")

# keys of a perturbation entry that say how to branch, not how to perturb (the others are
# the perturbation's options)
BRANCH_KEYS = ("name", "label", "where", "at_step", "at_epoch", "data_seeds", "epochs")
# the perturbation option kinds (perturb.PERTURBATION_OPTIONS) a list of values sweeps
SWEPT_KINDS = ("number", "positive")
# the kinds of interpolation pairs, in the order the pairs are listed
INTERPOLATION_KINDS = ("seeds", "data_seeds", "branches", "instability", "init_final")


class ConfigError(ValueError):
    """A config mistake, with the key it concerns and how to fix it."""


@dataclass(frozen=True)
class RunSpec:
    """Every hyper-parameter of one training run. Its JSON form keys the run (rerun trigger)."""

    study: str
    run_id: str
    model: str  # label used in the run id
    model_name: str  # registry name
    model_settings: dict[str, Any]
    shortcut: str
    dataset: str
    init: str  # label used in the run id
    optimizer: str  # label used in the run id
    optimizer_name: str  # registry name
    optimizer_settings: dict[str, Any]
    seed: int
    epochs: int
    batch_size: int
    eval_batch_size: int
    schedule: str
    normalize: bool | dict[str, list[float]]  # train-split stats, none, or {mean, std}
    augment: bool
    checkpoint_every_epochs: int | None
    checkpoint_every_steps: int | None
    init_name: str = ""  # registry name ('' = same as init)
    init_source: str | None = None  # '<study>/<run_id>' whose final weights start it
    perturbation: str = ""  # label of the perturbation of a branch ('' = not a branch)
    perturbation_options: dict[str, Any] | None = None  # name and options of that perturbation
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    compile: bool = False  # torch.compile the training forward
    gradients_every_steps: int | None = None
    track_grad_reached: bool = False
    measures: dict[str, Any] = field(default_factory=dict)
    # the init entry's options (mode, layers, bias) that differ from the init's defaults
    # (catalog.INITS[init_name].defaults): {} = the plain init
    init_options: dict[str, Any] = field(default_factory=dict)
    # the dataset's input transform on the device, in pixel space before normalisation:
    # {pad_to: side, channels: 3} (only what differs from the dataset); {} = as stored
    inputs: dict[str, Any] = field(default_factory=dict)
    # the seed of the data order and augmentation; None = the run's seed (one equal to the
    # seed is stored as None: the same run, the same key)
    data_seed: int | None = None
    # a branch: the step of its source run's checkpoint it starts from; None = the final one
    branch_step: int | None = None

    def __post_init__(self) -> None:
        if self.data_seed is not None and self.data_seed == self.seed:
            object.__setattr__(self, "data_seed", None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in _OMITTED_WHEN_EMPTY:
            if not d[k]:
                del d[k]
        for k in _OMITTED_WHEN_NONE:
            if d[k] is None:
                del d[k]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        return cls(**d)

    @property
    def order_seed(self) -> int:
        """The seed of the data order and augmentation: ``data_seed``, else ``seed`` (which
        always seeds the init, and a branch's perturbation)."""
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def input_shape(self) -> tuple[int, int]:
        """(channels, side) of the images the model sees: the dataset's, after ``inputs``."""
        ds = catalog.DATASETS[self.dataset]
        return self.inputs.get("channels", ds.channels), self.inputs.get("pad_to", ds.size)

    @property
    def steps_per_epoch(self) -> int:
        return -(-catalog.DATASETS[self.dataset].train_size // self.batch_size)

    def checkpoint_steps(self) -> list[int]:
        """The steps at which this run saves a checkpoint (if it does not diverge)."""
        per_epoch = self.steps_per_epoch
        total = per_epoch * self.epochs
        steps = {0, total}
        if self.checkpoint_every_steps:
            steps |= set(range(0, total + 1, self.checkpoint_every_steps))
        if self.checkpoint_every_epochs:
            steps |= {
                e * per_epoch for e in range(0, self.epochs + 1, self.checkpoint_every_epochs)
            }
        return sorted(steps)


@dataclass(frozen=True)
class Study:
    name: str
    runs: dict[str, RunSpec]  # run_id -> spec, in grid order
    datasets: tuple[str, ...]
    figures: dict[str, Any]
    keep_step_checkpoints: bool = True
    features: dict[str, Any] = field(default_factory=dict)
    gradients: dict[str, Any] = field(default_factory=dict)
    similarity_pairs: tuple[tuple[str, str, str], ...] = ()  # (run_a, run_b, kind)
    target: bool = True  # False: resolved only because another study starts from its runs
    # the claims to test (rule findings): each {id, statement, test, params (defaults filled
    # in), threshold, expect, note}; a note says why this variant cannot test the claim
    claims: tuple[dict[str, Any], ...] = ()
    min_accuracy: float | None = None  # training check: best test accuracy over seeds
    expect_failure: tuple[str, ...] = ()  # model labels whose failure to train is studied
    # the study's `interpolation` settings (defaults filled in), and the pairs of
    # checkpoints to interpolate between (none unless enabled): each {pair (its id), kind,
    # run_a, end_a, run_b, end_b}, an end being "init" (step 0) or "final"
    interpolation: dict[str, Any] = field(default_factory=dict)
    interpolation_pairs: tuple[dict[str, str], ...] = ()
    # the study's `analyses` (analyses.ANALYSES; defaults filled in), each {enabled, ...};
    # not hyper-parameters: no RunSpec holds them
    analyses: dict[str, dict[str, Any]] = field(default_factory=dict)


def _schema_error(err: Any) -> str:
    where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
    msg = err.message
    if err.validator == "additionalProperties" and isinstance(err.schema, dict):
        allowed = sorted(err.schema.get("properties", {}))
        msg += f". Allowed keys here: {', '.join(allowed)}"
    elif err.validator == "oneOf" and err.context:
        # an entry that is neither a name nor a valid mapping: report the deepest error of
        # the alternative that has the instance's type
        wrong_type = {
            e.relative_schema_path[0]
            for e in err.context
            if e.validator == "type" and not e.relative_path and e.relative_schema_path
        }
        relevant = [
            e
            for e in err.context
            if not (e.validator == "type" and not e.relative_path)
            and not (e.relative_schema_path and e.relative_schema_path[0] in wrong_type)
        ]
        if relevant:
            return _schema_error(max(relevant, key=lambda e: len(e.absolute_path)))
    return f"config key '{where}': {msg}"


def validate_schema(config: dict[str, Any], schema: Path | str = DEFAULT_SCHEMA) -> None:
    """Check types and keys with snakemake.utils.validate (which also fills defaults in)."""
    # here, not at the top: the jobs import this module (RunSpec) and need neither
    import jsonschema
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    try:
        validate(config, str(schema))
    except WorkflowError as e:
        inner = e.__context__
        if not isinstance(inner, jsonschema.ValidationError):
            raise
        raise ConfigError(
            _schema_error(inner) + f"\n(the schema with every key is {schema})"
        ) from None


class Problems:
    """The mistakes found in a config, gathered so that one error reports them all: each is
    added as ``config key '<key>': <message>`` and raised, once each and in the order found,
    by :meth:`raise_if_any`."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.messages.append(f"config key '{key}': {message}")

    def __len__(self) -> int:
        return len(self.messages)

    def raise_if_any(self) -> None:
        messages = list(dict.fromkeys(self.messages))  # a grid problem once, not once per run
        if messages:
            raise ConfigError(
                "the config has {} problem{}:\n  - {}".format(
                    len(messages), "s" * (len(messages) > 1), "\n  - ".join(messages)
                )
            )


# --- a study: checks ---------------------------------------------------------------------


def _entry(item: str | dict[str, Any]) -> dict[str, Any]:
    """A model, init or optimizer entry as a mapping: a bare name is ``{name: <name>}``."""
    return {"name": item} if isinstance(item, str) else dict(item)


def _label(entry: dict[str, Any]) -> str:
    """The label of a model or optimizer entry in its run ids: its ``label``, else its name."""
    return entry.get("label", entry["name"])


def _init_label(init: dict[str, Any]) -> str:
    if "label" in init:
        return init["label"]
    if init["name"] == "from_run":
        digest = hashlib.sha256(init.get("run", "").encode()).hexdigest()[:8]
        return f"from-{digest}"
    return init["name"]


def _duplicates(labels: list[str]) -> list[str]:
    return sorted({x for x in labels if labels.count(x) > 1})


def _check_name(kind: str, key: str, name: str, registry: dict[str, Any], problems: Problems):
    """Whether ``name`` is in ``registry`` (a problem at ``key`` when not)."""
    if name not in registry:
        problems.add(key, f"unknown {kind} '{name}'. Valid {kind}s: {catalog.describe(registry)}")
        return False
    return True


def _check_names(
    key: str,
    study: dict[str, Any],
    models: list[dict[str, Any]],
    inits: list[dict[str, Any]],
    optimizers: list[dict[str, Any]],
    problems: Problems,
) -> list[dict[str, Any]]:
    """Each model, dataset, init, schedule and optimizer of ``study`` (at config key ``key``)
    is in its registry, with only the settings or options it has. Returns each init's
    options (see :func:`_init_options`), ``{}`` for an unknown init."""
    _check_models(key, models, problems)
    for i, dataset in enumerate(study["datasets"]):
        _check_name("dataset", f"{key}/datasets/{i}", dataset, catalog.DATASETS, problems)
    init_options = _check_inits(key, inits, models, problems)
    _check_name("schedule", f"{key}/schedule", study["schedule"], catalog.SCHEDULES, problems)
    _check_optimizers(key, optimizers, problems)
    return init_options


def _check_models(key: str, models: list[dict[str, Any]], problems: Problems) -> None:
    for i, model in enumerate(models):
        if not _check_name("model", f"{key}/models/{i}", model["name"], catalog.MODELS, problems):
            continue
        model_spec = catalog.MODELS[model["name"]]
        for setting in MODEL_SETTINGS:
            if setting in model and setting not in model_spec.settings:
                problems.add(
                    f"{key}/models/{i}/{setting}",
                    f"model '{model['name']}' has no setting '{setting}' (its settings: "
                    f"{', '.join(model_spec.settings) or 'none'}). Remove the key.",
                )


def _check_inits(
    key: str, inits: list[dict[str, Any]], models: list[dict[str, Any]], problems: Problems
) -> list[dict[str, Any]]:
    """Each init is known, with its own options, ``run`` exactly for from_run, and weights
    for every model that takes ``pretrained``. Returns the options of each init."""
    init_options: list[dict[str, Any]] = []
    for i, init in enumerate(inits):
        where = f"{key}/inits/{i}"
        if not _check_name("init", where, init["name"], catalog.INITS, problems):
            init_options.append({})
            continue
        init_options.append(_init_options(where, init, problems))
        if init["name"] == "from_run" and "run" not in init:
            problems.add(where, "from_run needs 'run': [<study>/]<run_id>")
        elif init["name"] != "from_run" and "run" in init:
            problems.add(where, f"'run' is only for from_run, not '{init['name']}'")
        if init["name"] == "pretrained":
            for model in models:
                model_spec = catalog.MODELS.get(model["name"])
                if "pretrained" not in model.get("inits", ["pretrained"]):
                    continue
                if model_spec is not None and model_spec.pretrained is None:
                    able = [n for n, x in catalog.MODELS.items() if x.pretrained]
                    problems.add(
                        where,
                        f"model '{model['name']}' has no pretrained weights; models that do: "
                        f"{', '.join(able)}",
                    )
    return init_options


def _init_options(key: str, init: dict[str, Any], problems: Problems) -> dict[str, Any]:
    """The options of the init entry ``init`` (at config key ``key``) that differ from the
    init's defaults (``catalog.INITS[name].defaults``), in one canonical form: ``layers`` in
    the registry's order, a ``bias`` mapping whose kinds all agree as one word. So an entry
    that spells out the defaults is the plain init (same run, same key)."""
    name = init["name"]
    allowed = catalog.INITS[name].defaults
    given = {k: v for k, v in init.items() if k not in INIT_ENTRY_KEYS}
    for option in given:
        if option not in allowed:
            kaiming = [n for n, x in catalog.INITS.items() if "mode" in x.defaults]
            hint = f" ('mode' is for {', '.join(kaiming)} only)" if option == "mode" else ""
            problems.add(
                f"{key}/{option}",
                f"init '{name}' has no option '{option}' (its options: "
                f"{', '.join(allowed) or 'none'}){hint}. Remove the key.",
            )
    out: dict[str, Any] = {}
    if "mode" in given and "mode" in allowed and given["mode"] != allowed["mode"]:
        out["mode"] = given["mode"]
    layers = list(allowed.get("layers", []))
    if "layers" in given and "layers" in allowed:
        layers = [k for k in catalog.INIT_LAYER_KINDS if k in given["layers"]]
        if layers != list(allowed["layers"]):
            out["layers"] = layers
    if "bias" in given and "bias" in allowed:
        bias = given["bias"]
        if isinstance(bias, dict):
            for kind in bias:
                if kind not in layers:
                    problems.add(
                        f"{key}/bias/{kind}",
                        f"init '{name}' does not touch {kind} layers (layers: "
                        f"{', '.join(layers)}), so their biases keep PyTorch's default anyway; "
                        f"remove '{kind}' here or add it to 'layers'",
                    )
            bias = {k: bias.get(k, "zero") for k in catalog.INIT_BIAS_KINDS}
            if len(set(bias.values())) == 1:
                bias = next(iter(bias.values()))
        if bias != allowed["bias"]:
            out["bias"] = bias
    return out


def _check_optimizers(key: str, optimizers: list[dict[str, Any]], problems: Problems) -> None:
    for i, optimizer in enumerate(optimizers):
        name = optimizer["name"]
        if not _check_name(
            "optimizer", f"{key}/optimizers/{i}", name, catalog.OPTIMIZERS, problems
        ):
            continue
        allowed = catalog.OPTIMIZER_SETTINGS[name]
        for setting in optimizer:
            if setting not in ("name", "label") and setting not in allowed:
                problems.add(
                    f"{key}/optimizers/{i}/{setting}",
                    f"optimizer '{name}' has no setting '{setting}' (its settings: "
                    f"{', '.join(allowed)}). Remove the key.",
                )


def _check_duplicates(
    key: str,
    study: dict[str, Any],
    models: list[dict[str, Any]],
    inits: list[dict[str, Any]],
    optimizers: list[dict[str, Any]],
    problems: Problems,
) -> None:
    """Each seed and dataset listed once, each model, init and optimizer label once (the
    labels name the runs), and the inits a model restricts itself to among the study's."""
    for axis in ("seeds", "data_seeds"):
        seeds = study.get(axis, [])
        if len(set(seeds)) != len(seeds):
            problems.add(f"{key}/{axis}", f"duplicated seeds {seeds}; list each seed once")
    for axis, entries in (("models", models), ("optimizers", optimizers)):
        duplicated = _duplicates([_label(entry) for entry in entries])
        if duplicated:
            problems.add(
                f"{key}/{axis}",
                f"{', '.join(duplicated)} listed more than once; give each entry a distinct "
                "'label' (it names the runs)",
            )
    if len(set(study["datasets"])) != len(study["datasets"]):
        problems.add(key, "a dataset is listed twice; list each once")
    init_labels = [_init_label(init) for init in inits]
    if len(set(init_labels)) != len(inits):
        problems.add(
            f"{key}/inits",
            f"{', '.join(_duplicates(init_labels))} listed more than once; list each once, "
            "or give each entry a distinct 'label' (it names the runs)",
        )
    known = {init["name"] for init in inits} | set(init_labels)
    for i, model in enumerate(models):
        for wanted in model.get("inits", []):
            if wanted not in known:
                problems.add(
                    f"{key}/models/{i}/inits",
                    f"'{wanted}' is not among the study's inits ({', '.join(init_labels)})",
                )


def _check_inputs(key: str, study: dict[str, Any], problems: Problems) -> dict[str, dict[str, int]]:
    """Per dataset of ``study``, its input transform (``inputs``) with the no-op keys left
    out: ``{dataset: {pad_to: side, channels: 3}}``."""
    out: dict[str, dict[str, int]] = {}
    for dataset, transform in (study.get("inputs") or {}).items():
        where = f"{key}/inputs/{dataset}"
        if dataset not in study["datasets"]:
            problems.add(
                where,
                f"'{dataset}' is not among the study's datasets "
                f"({', '.join(study['datasets'])}); remove the entry or fix the name",
            )
            continue
        data = catalog.DATASETS.get(dataset)
        if data is None:
            continue  # reported as an unknown dataset
        resolved = {}
        pad_to = transform.get("pad_to", data.size)
        if pad_to < data.size:
            problems.add(
                f"{where}/pad_to",
                f"{pad_to} is smaller than the {data.size}x{data.size} images of '{dataset}'; "
                f"padding only grows an image: use at least {data.size}",
            )
        elif pad_to != data.size:
            resolved["pad_to"] = pad_to
        channels = transform.get("channels", data.channels)
        if channels != data.channels and data.channels != 1:
            problems.add(
                f"{where}/channels",
                f"'{dataset}' has {data.channels} channels; an image is only repeated from 1 "
                "channel to 3: remove the key",
            )
        elif channels != data.channels:
            resolved["channels"] = channels
        if resolved:
            out[dataset] = resolved
    return out


def _check_normalize(
    key: str, study: dict[str, Any], inputs: dict[str, dict[str, int]], problems: Problems
) -> None:
    """A per-dataset ``normalize`` covers every dataset, with one mean and one std per
    channel of the images the model sees (after ``inputs``)."""
    normalize = study["normalize"]
    if not isinstance(normalize, dict):
        return
    for dataset in study["datasets"]:
        norm = normalize.get(dataset)
        channels = inputs.get(dataset, {}).get("channels")
        if channels is None and dataset in catalog.DATASETS:
            channels = catalog.DATASETS[dataset].channels
        if dataset not in normalize:
            problems.add(
                f"{key}/normalize",
                f"nothing for dataset '{dataset}' (give per dataset {{mean, std}}, true for the "
                "training split's statistics or false for pixels in [0, 1])",
            )
        elif (
            isinstance(norm, dict)
            and channels is not None
            and any(len(norm[k]) != channels for k in ("mean", "std"))
        ):
            after = f" (after inputs/{dataset}/channels)" if dataset in inputs else ""
            problems.add(
                f"{key}/normalize/{dataset}",
                f"give {channels} value(s) for mean and for std, one per channel of the "
                f"images{after}",
            )


def _check_cadence(key: str, study: dict[str, Any], problems: Problems) -> None:
    """The study saves checkpoints at some cadence (epochs, steps or both)."""
    checkpoint = study.get("checkpoint") or {}
    if checkpoint.get("every_epochs") is None and checkpoint.get("every_steps") is None:
        problems.add(
            f"{key}/checkpoint",
            "set every_epochs and/or every_steps (the init and the final weights are always saved)",
        )


def _check_run_cadence(key: str, run: RunSpec, problems: Problems) -> None:
    """The batch of ``run`` fits its training split, and each checkpoint cadence fires
    within its training."""
    train_size = catalog.DATASETS[run.dataset].train_size
    if run.batch_size > train_size:
        problems.add(
            f"{key}/batch_size",
            f"{run.batch_size} is larger than the {train_size} training images of "
            f"'{run.dataset}'; use at most {train_size}",
        )
    every_epochs, every_steps = run.checkpoint_every_epochs, run.checkpoint_every_steps
    if every_epochs is not None and every_epochs > run.epochs:
        problems.add(
            f"{key}/checkpoint/every_epochs",
            f"{every_epochs} never fires in {run.epochs} epochs (model {run.model} on "
            f"{run.dataset}); use a value <= {run.epochs}",
        )
    steps = run.steps_per_epoch * run.epochs
    if every_steps is not None and every_steps > steps:
        problems.add(
            f"{key}/checkpoint/every_steps",
            f"{every_steps} never fires in the {steps} steps of model {run.model} on "
            f"{run.dataset}; use a smaller value",
        )


# --- a study: its runs -------------------------------------------------------------------


def _resolve_study(name: str, study: dict[str, Any], problems: Problems) -> Study:
    """The study ``name`` (its config mapping ``study``, any variant applied) checked and
    expanded into its runs and their perturbation branches. When a check before the grid
    fails, an empty Study: expanding the grid would only repeat the problem."""
    key = f"studies/{name}"
    models = [_entry(item) for item in study["models"]]
    inits = [_entry(item) for item in study["inits"]]
    optimizers = [_entry(item) for item in study["optimizers"]]
    found = len(problems)
    init_options = _check_names(key, study, models, inits, optimizers, problems)
    _check_duplicates(key, study, models, inits, optimizers, problems)
    inputs = _check_inputs(key, study, problems)
    _check_normalize(key, study, inputs, problems)
    _check_cadence(key, study, problems)
    if len(problems) > found:
        return Study(name, {}, (), {})
    runs = _expand_grid(name, study, models, inits, init_options, optimizers, inputs, problems)
    runs.update(_branches(key, runs, study, problems))
    # with data_seeds the data order is an axis of its own; without, it follows the seed
    own_order = "data_seeds" in study
    interpolation = dict(study["interpolation"])
    return Study(
        name,
        runs,
        tuple(study["datasets"]),
        dict(study["figures"]),
        keep_step_checkpoints=(study.get("checkpoint") or {}).get("keep_steps", True),
        features=dict(study["features"]),
        gradients=dict(study["gradients"]),
        similarity_pairs=_pairs(runs, study["similarity"]["pairs"], own_order),
        interpolation=interpolation,
        interpolation_pairs=(
            interpolation_pairs(
                _interpolated_runs(key, runs, interpolation, problems),
                interpolation["pairs"],
                own_order,
            )
            if interpolation["enabled"]
            else ()
        ),
        analyses=_analyses(key, runs, study.get("analyses") or {}, problems),
    )


def _analyses(
    key: str, runs: dict[str, RunSpec], settings: dict[str, Any], problems: Problems
) -> dict[str, dict[str, Any]]:
    """The study's ``analyses`` settings, checked: a log-spaced selection needs room for
    step 0 and the final step, a ``where`` names grid columns and keeps some run."""
    from .analyses import analysed_runs  # torch-free at import, as this module

    out = {name: dict(options) for name, options in settings.items()}
    for name, options in out.items():
        if not options.get("enabled"):
            continue
        where = f"{key}/analyses/{name}"
        most = options.get("max_checkpoints")
        if options.get("checkpoints") == "log_steps" and most is not None and most < 2:
            problems.add(
                f"{where}/max_checkpoints",
                f"{most} leaves no room for step 0 and the final step of log_steps; use >= 2",
            )
        unknown = sorted(set(options.get("where") or {}) - set(columns.BRANCH_FILTERS))
        if unknown:
            problems.add(
                f"{where}/where",
                f"unknown columns {unknown}; filter on {', '.join(columns.BRANCH_FILTERS)}",
            )
        elif runs and not analysed_runs(runs, options.get("where")):
            problems.add(f"{where}/where", f"{options['where']} matches none of the study's runs")
    return out


def _optimizer_settings(
    study: dict[str, Any], optimizer: dict[str, Any], model: dict[str, Any]
) -> dict[str, Any]:
    """The settings of the optimizer entry ``optimizer`` for the runs of the model entry
    ``model`` in ``study``. Each level overrides the ones before it:

        catalog default (``catalog.OPTIMIZERS[name].defaults``)
        < study (its ``lr``, ``weight_decay``)
        < optimizer entry (every setting it gives)
        < model entry (its ``lr``, ``weight_decay``)
    """
    settings = dict(catalog.OPTIMIZERS[optimizer["name"]].defaults)
    settings.update({k: study[k] for k in ("lr", "weight_decay") if k in study})
    settings.update({k: v for k, v in optimizer.items() if k not in ("name", "label")})
    settings.update({k: model[k] for k in ("lr", "weight_decay") if k in model})
    return settings


def _expand_grid(
    name: str,
    study: dict[str, Any],
    models: list[dict[str, Any]],
    inits: list[dict[str, Any]],
    init_options: list[dict[str, Any]],
    optimizers: list[dict[str, Any]],
    inputs: dict[str, dict[str, int]],
    problems: Problems,
) -> dict[str, RunSpec]:
    """The runs of the grid models x datasets x inits x optimizers x seeds x data_seeds, in
    that order, keyed by run id ``<model>_<dataset>_<init>_<optimizer>_s<seed>`` (with
    ``-d<data seed>`` appended when a data seed differs from the seed); a model entry with
    its own ``inits`` takes only those."""
    key = f"studies/{name}"
    checkpoint = study.get("checkpoint") or {}
    normalize = study["normalize"]
    measures = dict(study["measures"])
    if not measures.get("exclude", True):
        del measures["exclude"]  # [] = the default: every parameter
    runs: dict[str, RunSpec] = {}
    grid = itertools.product(
        models,
        study["datasets"],
        list(zip(inits, init_options, strict=True)),
        optimizers,
        study["seeds"],
        study.get("data_seeds", [None]),
    )
    for model, dataset, (init, options), optimizer, seed, data_seed in grid:
        init_label = _init_label(init)
        if "inits" in model and not {init["name"], init_label} & set(model["inits"]):
            continue  # this model takes only some of the study's inits
        source = init.get("run")
        if source is not None and "/" not in source:
            source = f"{name}/{source}"
        model_label, optimizer_label = _label(model), _label(optimizer)
        run = RunSpec(
            study=name,
            run_id=f"{model_label}_{dataset}_{init_label}_{optimizer_label}_"
            + _seed_id(seed, data_seed),
            model=model_label,
            model_name=model["name"],
            model_settings={k: model[k] for k in MODEL_SETTINGS if k in model},
            shortcut=catalog.MODELS[model["name"]].shortcut,
            dataset=dataset,
            init=init_label,
            init_name=init["name"],
            init_source=source,
            optimizer=optimizer_label,
            optimizer_name=optimizer["name"],
            optimizer_settings=_optimizer_settings(study, optimizer, model),
            seed=seed,
            epochs=model.get("epochs", study["epochs"]),
            batch_size=model.get("batch_size", study["batch_size"]),
            eval_batch_size=study["eval_batch_size"],
            schedule=study["schedule"],
            normalize=normalize[dataset] if isinstance(normalize, dict) else normalize,
            augment=study["augment"],
            checkpoint_every_epochs=checkpoint.get("every_epochs"),
            checkpoint_every_steps=checkpoint.get("every_steps"),
            precision=study["precision"],
            compile=study["compile"],
            gradients_every_steps=study["gradients"].get("every_steps"),
            track_grad_reached=study["gradients"]["track_reached"],
            measures=dict(measures),
            init_options=options,
            inputs=inputs.get(dataset, {}),
            data_seed=data_seed,
        )
        _check_run_cadence(key, run, problems)
        if run.run_id in runs:
            problems.add(key, f"two grid points share the run id {run.run_id}")
        runs[run.run_id] = run
    return runs


def _seed_id(seed: int, data_seed: int | None) -> str:
    """The seeds' part of a run id: ``s<seed>``, ``s<seed>-d<data seed>`` when they differ."""
    return f"s{seed}" if data_seed in (None, seed) else f"s{seed}-d{data_seed}"


def _branches(key: str, runs: dict[str, RunSpec], study: dict[str, Any], problems: Problems):
    """The perturb-and-retrain branches of the study: for each perturbation entry, each run
    its ``where`` selects branches once per value of each option given as a list, per
    branching step (``at_step``/``at_epoch``; default the final weights) and per data seed
    (``data_seeds``; default the branch's seed), in that order (ids: :func:`_branch`)."""
    out: dict[str, RunSpec] = {}
    labels = []
    keep_steps = (study.get("checkpoint") or {}).get("keep_steps", True)
    for i, entry in enumerate(study["perturbations"]):
        where = f"{key}/perturbations/{i}"
        sweep = _option_sweep(where, entry, problems)
        if not sweep:
            continue
        label = entry.get("label", entry["name"].replace("_", "-"))
        labels.append(label)
        sources = _branch_sources(f"{where}/where", runs, entry, problems)
        steps = _branch_steps(where, label, entry, sources, keep_steps, problems)
        data_seeds = entry.get("data_seeds", [None])
        if len(set(data_seeds)) != len(data_seeds):
            problems.add(f"{where}/data_seeds", f"duplicated seeds {data_seeds}; list each once")
        for run in sources:
            for (suffix, options), step, data_seed in itertools.product(
                sweep, steps[run.run_id], data_seeds
            ):
                branch = _branch(run, entry, label, suffix, options, step, data_seed, study)
                if branch.run_id in out or branch.run_id in runs:
                    problems.add(where, f"two branches share the run id {branch.run_id}")
                out[branch.run_id] = branch
    if len(set(labels)) != len(labels):
        problems.add(f"{key}/perturbations", "give each entry a distinct 'label'")
    return out


def _branch(
    run: RunSpec,
    entry: dict[str, Any],
    label: str,
    suffix: str,
    options: dict[str, Any],
    step: int | None,
    data_seed: int | None,
    study: dict[str, Any],
) -> RunSpec:
    """The branch of ``run`` for a perturbation entry with ``options`` (one value of each
    swept option, named by ``suffix``), from its checkpoint at ``step`` (None: the final
    one), trained on with the data order of ``data_seed`` (None: the branch's seed). Its id
    is ``<run id>_<label>``, then, only for what the entry varies, ``-<option><value>``
    (the ``suffix``), ``-k<step>`` (at_step/at_epoch given) and ``-d<data seed>``
    (data_seeds given): an entry that varies nothing names its branches as it always has."""
    branch_id = f"{run.run_id}_{label}{suffix}"
    if "at_step" in entry or "at_epoch" in entry:
        branch_id += f"-k{step}"
    if "data_seeds" in entry:
        branch_id += f"-d{data_seed}"
    return RunSpec(
        **{
            **run.to_dict(),
            "run_id": branch_id,
            "seed": run.seed + study["perturb_seed_offset"],
            "data_seed": data_seed,
            "epochs": entry.get("epochs", run.epochs),
            "branch_step": step,
            "init_name": "perturbed",
            "init_source": f"{run.study}/{run.run_id}",
            "perturbation": label,
            "perturbation_options": {"name": entry["name"], **options},
        }
    )


def _compact(value: Any) -> str:
    """A swept option's value in a run id: short (1e-06, 0.001, 2), exact, no '+' or '/'."""
    if isinstance(value, float):
        text = f"{value:g}"
        return (text if float(text) == value else repr(value)).replace("+", "")
    return str(value)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _option_sweep(
    where: str, entry: dict[str, Any], problems: Problems
) -> list[tuple[str, dict[str, Any]]]:
    """The option sets of a perturbation entry (at config key ``where``), each with its id
    suffix: one per combination of the values of its numeric options given as a list
    (``epsilon: [1e-6, 1e-3]``), in the registry's option order; ``[("", options)]`` when
    none is. Each set is checked by validate_perturbation; [] when one is refused."""
    name = entry["name"]
    options = {k: v for k, v in entry.items() if k not in BRANCH_KEYS}
    kinds = PERTURBATION_OPTIONS.get(name, {})
    swept = [
        k
        for k, (kind, _, _) in kinds.items()
        if kind in SWEPT_KINDS and isinstance(options.get(k), list)
    ]
    for k in swept:
        values = options[k]
        if not values:
            problems.add(f"{where}/{k}", "an empty list; give at least one value")
            return []
        if all(_is_number(v) for v in values) and len(set(values)) != len(values):
            problems.add(f"{where}/{k}", f"{values} lists a value twice; list each once")
            return []
    out = []
    for combo in itertools.product(*(options[k] for k in swept)):
        chosen = {**options, **dict(zip(swept, combo, strict=True))}
        try:
            validate_perturbation(name, chosen)
        except ValueError as e:
            problems.add(where, str(e))
            return []
        suffix = "".join(
            f"-{k.replace('_', '-')}{_compact(v)}" for k, v in zip(swept, combo, strict=True)
        )
        out.append((suffix, chosen))
    return out


def _branch_steps(
    where: str,
    label: str,
    entry: dict[str, Any],
    sources: list[RunSpec],
    keep_steps: bool,
    problems: Problems,
) -> dict[str, list[int | None]]:
    """Per source run id, the steps its branches start from: ``[None]`` (the final weights)
    unless the entry gives ``at_step`` or ``at_epoch`` (epoch e = step e x the run's steps
    per epoch). Each must be a checkpoint the run saves, and one mid-epoch needs
    ``checkpoint.keep_steps`` (else it is deleted once measured, maybe before the branch
    reads it). A problem is reported once per value, with one run it fails for."""
    if "at_step" in entry and "at_epoch" in entry:
        problems.add(where, "give at_step or at_epoch, not both")
        return {run.run_id: [] for run in sources}
    unit = next((u for u in ("at_step", "at_epoch") if u in entry), None)
    if unit is None:
        return {run.run_id: [None] for run in sources}
    given = entry[unit] if isinstance(entry[unit], list) else [entry[unit]]
    if len(set(given)) != len(given):
        problems.add(f"{where}/{unit}", f"{given} lists a value twice; list each once")
    out: dict[str, list[int | None]] = {}
    failed: dict[int, list[tuple[RunSpec, int]]] = {}  # value -> the (run, step)s it fails
    for run in sources:
        out[run.run_id] = []
        for value in given:
            step = value if unit == "at_step" else value * run.steps_per_epoch
            if _unsaved(run, step, keep_steps, ""):
                failed.setdefault(value, []).append((run, step))
            else:
                out[run.run_id].append(step)
    for value, fails in failed.items():
        n = len(fails) - 1
        others = f" (and {n} other run{'s' * (n > 1)})" if n else ""
        message = _unsaved(*fails[0], keep_steps, others)
        problems.add(f"{where}/{unit}", f"perturbation '{label}': {unit} {value}: {message}")
    return out


def _unsaved(run: RunSpec, step: int, keep_steps: bool, others: str) -> str:
    """Why a branch of ``run`` (``others``: the other runs it stands for) cannot start from
    its checkpoint at ``step`` ('' when it can): the run saves none there, or deletes it (a
    mid-epoch step, keep_steps false)."""
    saved = run.checkpoint_steps()
    if step not in saved:
        nearest = sorted(sorted(saved, key=lambda s: (abs(s - step), s))[:4])
        return (
            f"run {run.run_id}{others} saves no checkpoint at step {step} (it trains "
            f"{saved[-1]} steps, {run.steps_per_epoch} per epoch; the nearest checkpoint "
            f"steps: {', '.join(map(str, nearest))}). Branch from one of those, or add "
            "checkpoint: every_steps (or every_epochs) so that the step is saved"
        )
    if not keep_steps and step % run.steps_per_epoch:
        return (
            f"step {step} is a mid-epoch checkpoint of run {run.run_id}{others}, deleted once "
            "measured (checkpoint.keep_steps: false). Set keep_steps: true, or branch from "
            "an epoch's end"
        )
    return ""


def _branch_sources(
    key: str, runs: dict[str, RunSpec], entry: dict[str, Any], problems: Problems
) -> list[RunSpec]:
    """The runs a perturbation branches from: every run, or those matching its ``where``
    ({field: value or [values]} on the run's grid coordinates)."""
    where = entry.get("where") or {}
    unknown = sorted(set(where) - set(columns.BRANCH_FILTERS))
    if unknown:
        fields = ", ".join(columns.BRANCH_FILTERS)
        problems.add(key, f"unknown field '{unknown[0]}'; filter on {fields}")
        return []
    wanted = {k: {str(x) for x in (v if isinstance(v, list) else [v])} for k, v in where.items()}
    sources = [
        run
        for run in runs.values()
        if all(str(getattr(run, k)) in values for k, values in wanted.items())
    ]
    if not sources:
        problems.add(key, f"{where} matches no run of the study; check the values")
    return sources


def _pairs(
    runs: dict[str, RunSpec], kinds: list[str], own_order: bool = False
) -> tuple[tuple[str, str, str], ...]:
    """Pairs of runs to compare: same model and dataset, differing in exactly one of seed,
    init, optimizer (when that kind is asked for); and each branch with its original. With
    ``own_order`` (the study gives data_seeds) the two runs also share their data order."""
    axes = {"seeds": "seed", "inits": "init", "optimizers": "optimizer"}
    base = [r for r in runs.values() if not r.perturbation]
    pairs = []
    for i, a in enumerate(base):
        for b in base[i + 1 :]:
            if (a.model, a.dataset) != (b.model, b.dataset):
                continue
            if own_order and a.order_seed != b.order_seed:
                continue
            diff = [k for k, f in axes.items() if getattr(a, f) != getattr(b, f)]
            if len(diff) == 1 and diff[0] in kinds:
                pairs.append((a.run_id, b.run_id, diff[0]))
    if "perturbations" in kinds:
        for r in runs.values():
            if r.perturbation:
                pairs.append((r.init_source.split("/", 1)[1], r.run_id, "perturbations"))
    return tuple(pairs)


def _all_but(run: RunSpec, *fields: str) -> str:
    """The key of ``run`` without its id and ``fields``: equal for runs differing only there."""
    d = run.to_dict()
    for f in ("run_id", "data_seed", *fields):
        d.pop(f, None)
    return json.dumps(d, sort_keys=True)


def _differing(runs: list[RunSpec], group, differ) -> list[tuple[RunSpec, RunSpec]]:
    """Every two runs (in grid order) with the same ``group(run)`` and different
    ``differ(run)``."""
    groups: dict[Any, list[RunSpec]] = {}
    for run in runs:
        groups.setdefault(group(run), []).append(run)
    return [
        (a, b)
        for members in groups.values()
        for i, a in enumerate(members)
        for b in members[i + 1 :]
        if differ(a) != differ(b)
    ]


def _source_id(run: RunSpec) -> str:
    return run.init_source.split("/", 1)[1]


def _instability_members(branches: list[RunSpec]) -> set[str]:
    """The branches that have a twin: the same source, entry, step and size, another data
    order."""
    pairs = _differing(branches, lambda r: _all_but(r), lambda r: r.order_seed)
    return {r.run_id for pair in pairs for r in pair}


# kind -> the (run_a, end_a, run_b, end_b) of its pairs, from (base runs, branches, own order)
_INTERPOLATION_RULES = {
    # base runs equal in all but the init seed (and, without data_seeds, the data order
    # that follows it): final vs final
    "seeds": lambda base, branches, own_order: [
        (a.run_id, "final", b.run_id, "final")
        for a, b in _differing(
            base,
            lambda r: (_all_but(r, "seed"), r.order_seed if own_order else None),
            lambda r: r.seed,
        )
    ],
    # base runs equal in all but the data seed
    "data_seeds": lambda base, branches, own_order: [
        (a.run_id, "final", b.run_id, "final")
        for a, b in _differing(base, lambda r: _all_but(r), lambda r: r.order_seed)
    ],
    # each branch against its source run (but the branches of an instability pair, which
    # are compared with each other)
    "branches": lambda base, branches, own_order: [
        (_source_id(r), "final", r.run_id, "final")
        for r in branches
        if r.run_id not in _instability_members(branches)
    ],
    # two branches of one source and entry, at one step and size, with two data orders
    "instability": lambda base, branches, own_order: [
        (a.run_id, "final", b.run_id, "final")
        for a, b in _differing(branches, lambda r: _all_but(r), lambda r: r.order_seed)
    ],
    # each base run's init against its final weights (the monotonic-interpolation test)
    "init_final": lambda base, branches, own_order: [
        (r.run_id, "init", r.run_id, "final") for r in base
    ],
}


def _interpolated_runs(
    key: str, runs: dict[str, RunSpec], interpolation: dict[str, Any], problems: Problems
) -> dict[str, RunSpec]:
    """The runs whose pairs are interpolated: those matching ``interpolation.where`` (grid
    coordinates, as a perturbation's ``where``), branches included; all without it."""
    if not interpolation.get("where"):
        return runs
    kept = _branch_sources(f"{key}/interpolation/where", runs, interpolation, problems)
    return {r.run_id: r for r in kept}


def interpolation_pairs(
    runs: dict[str, RunSpec], kinds: list[str] | tuple[str, ...], own_order: bool = False
) -> tuple[dict[str, str], ...]:
    """The pairs of checkpoints of a study's ``runs`` to interpolate between, of the
    ``kinds`` asked for (listed in :data:`INTERPOLATION_KINDS` order, each in grid order):
    each ``{pair, kind, run_a, end_a, run_b, end_b}``, an end being ``init`` (step 0) or
    ``final``. ``pair`` is ``<kind>_<run_a>_vs_<run_b>`` (``init_final_<run>``). With
    ``own_order`` (the study gives data_seeds) the data order is an axis of its own: a
    ``seeds`` pair then shares it; without, it follows the seed. Kinds the runs do not
    produce (no branches, one seed) yield no pairs."""
    base = [r for r in runs.values() if not r.perturbation]
    branches = [r for r in runs.values() if r.perturbation]
    out: dict[str, dict[str, str]] = {}
    for kind in (k for k in INTERPOLATION_KINDS if k in kinds):
        for run_a, end_a, run_b, end_b in _INTERPOLATION_RULES[kind](base, branches, own_order):
            pair = f"{kind}_{run_a}" + ("" if run_a == run_b else f"_vs_{run_b}")
            out.setdefault(
                pair,
                {
                    "pair": pair,
                    "kind": kind,
                    "run_a": run_a,
                    "end_a": end_a,
                    "run_b": run_b,
                    "end_b": end_b,
                },
            )
    return tuple(out.values())


# --- the config: studies selected, variants, sources -------------------------------------


def load_studies(config: dict[str, Any], schema: Path | str = DEFAULT_SCHEMA) -> dict[str, Study]:
    """Validate ``config`` (in place: schema defaults are filled in) and expand the selected
    studies into runs. Raises :class:`ConfigError` listing every mistake found."""
    if not isinstance(config, dict) or not config:
        raise ConfigError(
            "the config is empty: give a config.yaml with a 'studies' mapping (see README)"
        )
    validate_schema(config, schema)
    problems = Problems()
    selected = _selected(config, problems)
    if not _variant_is_defined(config, selected, problems):
        problems.raise_if_any()  # the recipe to check is unknown: stop before the grids
    studies = {}
    for name in selected:
        full_name, study = _variant(config, name, schema)
        resolved = _resolve_study(full_name, study, problems)
        studies[full_name] = _with_claims(resolved, study, config, name, problems)
    _check_sources(config, studies, problems, schema)
    _check_offline(config, studies, problems)
    problems.raise_if_any()
    return studies


def _selected(config: dict[str, Any], problems: Problems) -> list[str]:
    """The studies named by ``run`` (all when it is unset) that the config defines."""
    selected = config.get("run") or list(config["studies"])
    if isinstance(selected, str):
        selected = [selected]
    for name in selected:
        if name not in config["studies"]:
            problems.add(
                "run",
                f"no study named '{name}'. Studies in this config: {', '.join(config['studies'])}",
            )
    return [name for name in selected if name in config["studies"]]


def _variant_is_defined(config: dict[str, Any], selected: list[str], problems: Problems) -> bool:
    """Whether some selected study defines the config's ``variant`` (``default`` always is):
    a name none defines is a typo, refused with the variants that exist. A selected study
    without it runs as written (``make demo`` runs study ``demo``, which has no variants,
    with the others' ``demo`` variants)."""
    variant = config.get("variant", "default")
    defined = {name: config["studies"][name].get("variants", {}) for name in selected}
    if variant == "default" or not selected or any(variant in v for v in defined.values()):
        return True
    every = {v for study in config["studies"].values() for v in study.get("variants", {})}
    message = (
        f"no study selected by 'run' ({', '.join(dict.fromkeys(selected))}) defines a variant "
        f"'{variant}'. Variants in this config: {', '.join(['default', *sorted(every)])}"
    )
    elsewhere = [n for n, s in config["studies"].items() if variant in s.get("variants", {})]
    if elsewhere:
        message += f" ('{variant}' is a variant of {', '.join(elsewhere)}: add it to 'run')"
    problems.add("variant", message)
    return False


def _variant(config: dict[str, Any], name: str, schema) -> tuple[str, dict[str, Any]]:
    """The study ``name`` under the config's ``variant`` (when it defines that variant):
    its keys overridden by the variant's, validated again, named ``<name>-<variant>``.
    Every variant of the study is checked, so a typo in one not chosen today shows now."""
    study = config["studies"][name]
    variant = config.get("variant", "default")
    merged = {v: _merge_variant(name, study, v, schema) for v in study.get("variants", {})}
    if variant not in merged:
        return name, study
    return f"{name}-{variant}", merged[variant]


def _merge_variant(name: str, study: dict[str, Any], variant: str, schema) -> dict[str, Any]:
    merged = {**copy.deepcopy(study), **copy.deepcopy(study["variants"][variant])}
    merged.pop("variants")
    try:
        validate_schema({"studies": {f"{name}-{variant}": merged}}, schema)
    except ConfigError as e:
        raise ConfigError(f"variant '{variant}' of study '{name}': {e}") from None
    return merged


def _check_sources(
    config: dict[str, Any], studies: dict[str, Study], problems: Problems, schema
) -> None:
    """Each from_run init names a run that exists, with the same model; a study that is not
    selected but holds such a run is resolved too (not a target: its runs train as needed),
    under the config's variant like the others."""
    for resolved in list(studies.values()):
        key = f"studies/{resolved.name}/inits"
        for run_id, run in list(resolved.runs.items()):
            if run.init_source is None:
                continue
            source_study, _, source_run = run.init_source.partition("/")
            if source_study in config["studies"] and source_study != resolved.name:
                full_name, study = _variant(config, source_study, schema)
                if full_name not in studies:
                    extra = _resolve_study(full_name, study, problems)
                    studies[full_name] = dataclasses.replace(extra, target=False)
                if full_name != source_study:
                    source_study = full_name
                    run = dataclasses.replace(run, init_source=f"{full_name}/{source_run}")
                    resolved.runs[run_id] = run
            source = studies.get(source_study, Study("", {}, (), {})).runs.get(source_run)
            if source is None:
                problems.add(
                    key,
                    f"from_run names no run '{run.init_source}' (give [<study>/]<run_id> of a "
                    "run in this config)",
                )
            elif (source.model_name, source.model_settings) != (run.model_name, run.model_settings):
                problems.add(
                    key,
                    f"run {run.run_id} (model {run.model}) cannot start from {run.init_source} "
                    f"(model {source.model}); from_run needs the same model",
                )
            elif run.init_source == f"{resolved.name}/{run.run_id}":
                problems.add(key, f"{run.run_id} starts from itself")


def _check_offline(config: dict[str, Any], studies: dict[str, Study], problems: Problems) -> None:
    """Without ``download``, every dataset the studies use is already in ``data_dir``."""
    if config["download"]:
        return
    for dataset in sorted({d for resolved in studies.values() for d in resolved.datasets}):
        missing = missing_files(dataset, config["data_dir"])
        if missing:
            problems.add(
                "download",
                f"false, but dataset '{dataset}' is not in data_dir '{config['data_dir']}' "
                f"(missing {missing[0]}). Place torchvision's files there, point data_dir at "
                "them, or set download: true",
            )


# --- claims ------------------------------------------------------------------------------


def _run_value(run: RunSpec, column: str) -> str:
    return str(getattr(run, column))


def _matches(run: RunSpec, *filters: dict[str, Any]) -> bool:
    """Whether ``run`` passes every filter ({column: value | [values]}); a run of a branch
    passes only filters that name its perturbation (as the findings do)."""
    merged: dict[str, set] = {}
    for f in filters:
        for k, v in f.items():
            values = {str(x) for x in (v if isinstance(v, list) else [v])}
            merged[k] = merged[k] & values if k in merged else values
    if "perturbation" not in merged:
        merged["perturbation"] = {""}
    return all(_run_value(run, k) in v for k, v in merged.items())


def _vocabulary(config: dict[str, Any], name: str) -> dict[str, set[str]]:
    """Every value each claim column takes in study ``name`` or any of its variants: a
    claim's filter value outside it is a typo; inside it but not in the chosen variant, the
    claim is reported as not tested by that variant."""
    base = {k: v for k, v in config["studies"][name].items() if k != "variants"}
    forms = [base] + [{**base, **v} for v in config["studies"][name].get("variants", {}).values()]
    vocab: dict[str, set[str]] = {c: set() for c in columns.CLAIM}
    vocab["perturbation"].add("")
    for form in forms:
        for model in (_entry(x) for x in form.get("models", [])):
            vocab["model"].add(_label(model))
            vocab["model_name"].add(model["name"])
            if model["name"] in catalog.MODELS:
                vocab["shortcut"].add(catalog.MODELS[model["name"]].shortcut)
        vocab["dataset"].update(form.get("datasets", []))
        vocab["init"].update(_init_label(_entry(x)) for x in form.get("inits", []))
        vocab["optimizer"].update(_label(_entry(x)) for x in form.get("optimizers", []))
        vocab["perturbation"].update(
            p.get("label", p["name"].replace("_", "-")) for p in form.get("perturbations", [])
        )
    return vocab


def _check_param(
    where: str, param: catalog.ClaimParam, value: Any, vocab, problems: Problems
) -> None:
    cols = ", ".join(columns.CLAIM)
    if param.kind == "filter":
        if not isinstance(value, dict):
            problems.add(where, "give a mapping {column: value or [values]}")
            return
        for col, v in value.items():
            if col not in columns.CLAIM:
                problems.add(f"{where}/{col}", f"unknown column; columns: {cols}")
                continue
            for x in v if isinstance(v, list) else [v]:
                if not isinstance(x, str) or x not in vocab[col]:
                    known = ", ".join(repr(k) for k in sorted(vocab[col]))
                    problems.add(
                        f"{where}/{col}",
                        f"{x!r} is no {col} of this study or its variants ({known})",
                    )
    elif param.kind == "columns":
        if not isinstance(value, list) or any(c not in columns.CLAIM for c in value):
            problems.add(where, f"give a list of columns among {cols}")
    elif param.kind == "choice":
        if value not in param.choices:
            problems.add(where, f"{value!r} is not one of {', '.join(param.choices)}")
    elif param.kind == "bool":
        if not isinstance(value, bool):
            problems.add(where, "give true or false")
    elif param.kind == "number":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            problems.add(where, "give a number")
    elif param.kind == "string" and value is not None and not isinstance(value, str):
        problems.add(where, "give a string")


def _with_claims(
    resolved: Study, study: dict[str, Any], config: dict[str, Any], base: str, problems: Problems
) -> Study:
    """``resolved`` (study ``base`` of ``config``, its mapping ``study``) with its claims
    validated against the registry of claim tests (catalog.CLAIM_TESTS), their params
    completed with the defaults, and a note on each claim that this variant's runs cannot
    test; plus min_accuracy and the models marked expect_failure (neither is a
    hyper-parameter: no run id or RunSpec changes)."""
    key = f"studies/{resolved.name}/claims"
    vocab = _vocabulary(config, base)
    claims, ids = [], set()
    for i, claim in enumerate(study.get("claims", [])):
        where, found = f"{key}/{i}", len(problems)
        if claim["id"] in ids:
            problems.add(f"{where}/id", f"claim id '{claim['id']}' is used twice")
        ids.add(claim["id"])
        test = catalog.CLAIM_TESTS.get(claim["test"])
        if test is None:
            problems.add(
                f"{where}/test",
                f"unknown claim test '{claim['test']}'. Valid claim tests: "
                f"{catalog.describe(catalog.CLAIM_TESTS)}",
            )
            continue
        params = _claim_params(where, test, claim.get("params") or {}, vocab, problems)
        _check_claim_records(where, test.name, params, study, resolved.name, problems)
        claims.append(
            {
                "id": claim["id"],
                "statement": claim["statement"],
                "test": test.name,
                "params": params,
                "threshold": float(claim["threshold"]),
                "expect": claim["expect"],
                "note": _untested(resolved, test.name, params) if len(problems) == found else "",
            }
        )
    models = [_entry(item) for item in study["models"]]
    return dataclasses.replace(
        resolved,
        claims=tuple(claims),
        min_accuracy=study.get("min_accuracy"),
        expect_failure=tuple(_label(model) for model in models if model.get("expect_failure")),
    )


def _claim_params(
    where: str,
    test: catalog.ClaimTestSpec,
    given: dict[str, Any],
    vocab: dict[str, set[str]],
    problems: Problems,
) -> dict[str, Any]:
    """The params of a claim (at config key ``where``) of ``test``: those ``given``,
    checked, and the test's defaults for the others."""
    for name in given:
        if name not in test.params:
            problems.add(
                f"{where}/params/{name}",
                f"test '{test.name}' has no parameter '{name}' (its parameters: "
                f"{', '.join(test.params)})",
            )
    params = {}
    for name, param in test.params.items():
        if name in given:
            _check_param(f"{where}/params/{name}", param, given[name], vocab, problems)
            params[name] = given[name]
            continue
        if param.required:
            problems.add(f"{where}/params", f"test '{test.name}' needs '{name}' ({param.doc})")
        params[name] = param.default
    for name in ("branch", "control"):
        if name in test.params and params.get(name) not in (None, *vocab["perturbation"]):
            known = ", ".join(sorted(vocab["perturbation"] - {""})) or "none"
            problems.add(
                f"{where}/params/{name}",
                f"no perturbation labelled '{params[name]}' in this study or its variants "
                f"(labels: {known})",
            )
    return params


def _check_claim_records(
    where: str,
    test: str,
    params: dict[str, Any],
    study: dict[str, Any],
    name: str,
    problems: Problems,
) -> None:
    """The runs of ``study`` (named ``name``) record what the claim's test reads."""
    if test == "gradient_ratio" and not study["gradients"].get("every_steps"):
        problems.add(
            where,
            "test gradient_ratio needs gradient records: set gradients.every_steps in study "
            f"'{name}' (or override its claims)",
        )
    never = test == "share_unchanged" and params["measure"].startswith("never")
    if never and not study["gradients"]["track_reached"]:
        problems.add(
            f"{where}/params/measure",
            f"'{params['measure']}' needs gradients.track_reached: true in study '{name}'",
        )


def _untested(study: Study, test: str, params: dict[str, Any]) -> str:
    """Why the runs of ``study`` cannot test a claim ('' when they can)."""
    if not study.runs:
        return ""
    runs = list(study.runs.values())
    where = params.get("where") or {}
    if test in ("barrier", "barrier_step_change"):
        return _untested_pairs(study, params)
    if test == "representation_change" and not study.analyses.get("layer_similarity", {}).get(
        "enabled"
    ):
        return f"{study.name} has no layer-similarity analysis (analyses.layer_similarity)"
    if test == "perturbation_return":
        for k in ("branch", "control"):
            label = params.get(k)
            if label is not None and not any(
                _matches(r, where, {"perturbation": label}) for r in runs
            ):
                return f"{study.name} has no '{label}' branch matching {where or 'its runs'}"
        return ""
    for group in ("a", "b") if "a" in params else ("where",):
        f = params.get(group) or {}
        if not any(_matches(r, where, f) for r in runs):
            return f"no run of {study.name} matches {({**where, **f}) or 'the claim'}"
    return ""


def _untested_pairs(study: Study, params: dict[str, Any]) -> str:
    """Why ``study`` has no interpolation pair a barrier claim could read ('' when it has)."""
    kind, branch = params["kind"], params.get("branch")
    pairs = [p for p in study.interpolation_pairs if p["kind"] == kind]
    if branch:
        pairs = [p for p in pairs if study.runs[p["run_b"]].perturbation == branch]
    if pairs:
        return ""
    what = f"'{kind}' pairs" + (f" of '{branch}' branches" if branch else "")
    return f"the interpolation of {study.name} has no {what} (interpolation.enabled, pairs)"


def missing_files(dataset: str, data_dir: Path | str) -> list[str]:
    """The native files of a downloadable dataset that are not in ``data_dir``."""
    root = Path(data_dir)
    return [
        str(root / f)
        for f in catalog.DATASETS[dataset].files
        if not (root / f).is_file() and not (root / f"{f}.gz").is_file()
    ]
