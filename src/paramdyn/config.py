"""Validate a config and expand each study's grid into runs.

Light on purpose (no torch): the Snakefile calls :func:`load_studies` while it parses, so a
bad config stops before a single job starts. Types and keys are checked by the JSON schema
(through ``snakemake.utils.validate``); names and cross-field rules by the code below.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import catalog

DEFAULT_SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "config.schema.yaml"


MODEL_SETTINGS = ("width", "depth", "norm")  # keys of a model entry that change the model
INIT_ENTRY_KEYS = ("name", "label", "run")  # keys of an init entry that are not init options

# RunSpec fields added after runs were first keyed: left out of the run's JSON (its key)
# while empty, so the runs of configs that do not use them keep their key and do not retrain
_OMITTED_WHEN_EMPTY = ("init_options", "inputs")


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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in _OMITTED_WHEN_EMPTY:
            if not d[k]:
                del d[k]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        return cls(**d)

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


def _entry(item: str | dict[str, Any]) -> dict[str, Any]:
    return {"name": item} if isinstance(item, str) else dict(item)


def _init_label(init: dict[str, Any]) -> str:
    if "label" in init:
        return init["label"]
    if init["name"] == "from_run":
        digest = hashlib.sha256(init.get("run", "").encode()).hexdigest()[:8]
        return f"from-{digest}"
    return init["name"]


def _init_options(key: str, it: dict[str, Any], errors: list[str]) -> dict[str, Any]:
    """The options of the init entry ``it`` (at config key ``key``) that differ from the
    init's defaults (``catalog.INITS[name].defaults``), in one canonical form: ``layers`` in
    the registry's order, a ``bias`` mapping whose kinds all agree as one word. So an entry
    that spells out the defaults is the plain init (same run, same key)."""
    name = it["name"]
    allowed = catalog.INITS[name].defaults
    given = {k: v for k, v in it.items() if k not in INIT_ENTRY_KEYS}
    for k in given:
        if k not in allowed:
            kaiming = [n for n, x in catalog.INITS.items() if "mode" in x.defaults]
            hint = f" ('mode' is for {', '.join(kaiming)} only)" if k == "mode" else ""
            errors.append(
                f"config key '{key}/{k}': init '{name}' has no option '{k}' (its options: "
                f"{', '.join(allowed) or 'none'}){hint}. Remove the key."
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
                    errors.append(
                        f"config key '{key}/bias/{kind}': init '{name}' does not touch {kind} "
                        f"layers (layers: {', '.join(layers)}), so their biases keep PyTorch's "
                        f"default anyway; remove '{kind}' here or add it to 'layers'"
                    )
            bias = {k: bias.get(k, "zero") for k in catalog.INIT_BIAS_KINDS}
            if len(set(bias.values())) == 1:
                bias = next(iter(bias.values()))
        if bias != allowed["bias"]:
            out["bias"] = bias
    return out


def _inputs(key: str, s: dict[str, Any], errors: list[str]) -> dict[str, dict[str, int]]:
    """Per dataset of the study, its input transform (``inputs``) with the no-op keys left
    out; problems go to ``errors``."""
    out: dict[str, dict[str, int]] = {}
    for d, t in (s.get("inputs") or {}).items():
        where = f"{key}/inputs/{d}"
        if d not in s["datasets"]:
            errors.append(
                f"config key '{where}': '{d}' is not among the study's datasets "
                f"({', '.join(s['datasets'])}); remove the entry or fix the name"
            )
            continue
        ds = catalog.DATASETS.get(d)
        if ds is None:
            continue  # reported as an unknown dataset
        resolved = {}
        pad_to = t.get("pad_to", ds.size)
        if pad_to < ds.size:
            errors.append(
                f"config key '{where}/pad_to': {pad_to} is smaller than the {ds.size}x{ds.size} "
                f"images of '{d}'; padding only grows an image: use at least {ds.size}"
            )
        elif pad_to != ds.size:
            resolved["pad_to"] = pad_to
        channels = t.get("channels", ds.channels)
        if channels != ds.channels and ds.channels != 1:
            errors.append(
                f"config key '{where}/channels': '{d}' has {ds.channels} channels; an image "
                f"is only repeated from 1 channel to 3: remove the key"
            )
        elif channels != ds.channels:
            resolved["channels"] = channels
        if resolved:
            out[d] = resolved
    return out


def _check_name(kind: str, key: str, name: str, registry: dict[str, Any], errors: list[str]):
    if name not in registry:
        errors.append(
            f"config key '{key}': unknown {kind} '{name}'. Valid {kind}s: {catalog.describe(registry)}"
        )
        return False
    return True


def _resolve_study(name: str, s: dict[str, Any], errors: list[str]) -> Study:
    key = f"studies/{name}"
    models = [_entry(m) for m in s["models"]]
    optimizers = [_entry(o) for o in s["optimizers"]]
    for i, m in enumerate(models):
        if _check_name("model", f"{key}/models/{i}", m["name"], catalog.MODELS, errors):
            spec = catalog.MODELS[m["name"]]
            for k in MODEL_SETTINGS:
                if k in m and k not in spec.settings:
                    errors.append(
                        f"config key '{key}/models/{i}/{k}': model '{m['name']}' has no setting '{k}'"
                        f" (its settings: {', '.join(spec.settings) or 'none'}). Remove the key."
                    )
    for i, d in enumerate(s["datasets"]):
        _check_name("dataset", f"{key}/datasets/{i}", d, catalog.DATASETS, errors)
    inits = [_entry(it) for it in s["inits"]]
    init_options: list[dict[str, Any]] = []
    for i, it in enumerate(inits):
        if not _check_name("init", f"{key}/inits/{i}", it["name"], catalog.INITS, errors):
            init_options.append({})
            continue
        init_options.append(_init_options(f"{key}/inits/{i}", it, errors))
        if (it["name"] == "from_run") != ("run" in it):
            errors.append(
                f"config key '{key}/inits/{i}': "
                + ("from_run needs 'run': [<study>/]<run_id>" if "run" not in it else
                   f"'run' is only for from_run, not '{it['name']}'")
            )  # fmt: skip
        if it["name"] == "pretrained":
            for m in models:
                spec = catalog.MODELS.get(m["name"])
                if "pretrained" not in m.get("inits", ["pretrained"]):
                    continue
                if spec is not None and spec.pretrained is None:
                    able = [n for n, x in catalog.MODELS.items() if x.pretrained]
                    errors.append(
                        f"config key '{key}/inits/{i}': model '{m['name']}' has no pretrained "
                        f"weights; models that do: {', '.join(able)}"
                    )
    _check_name("schedule", f"{key}/schedule", s["schedule"], catalog.SCHEDULES, errors)
    for i, o in enumerate(optimizers):
        if _check_name("optimizer", f"{key}/optimizers/{i}", o["name"], catalog.OPTIMIZERS, errors):
            allowed = catalog.OPTIMIZER_SETTINGS[o["name"]]
            for k in o:
                if k not in ("name", "label") and k not in allowed:
                    errors.append(
                        f"config key '{key}/optimizers/{i}/{k}': optimizer '{o['name']}' has no "
                        f"setting '{k}' (its settings: {', '.join(allowed)}). Remove the key."
                    )
    if len(set(s["seeds"])) != len(s["seeds"]):
        errors.append(
            f"config key '{key}/seeds': duplicated seeds {s['seeds']}; list each seed once"
        )
    for axis, items in (("models", models), ("optimizers", optimizers)):
        labels = [m.get("label", m["name"]) for m in items]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            errors.append(
                f"config key '{key}/{axis}': {', '.join(dup)} listed more than once; give each "
                "entry a distinct 'label' (it names the runs)"
            )
    init_labels = [_init_label(it) for it in inits]
    if len(set(s["datasets"])) != len(s["datasets"]):
        errors.append(f"config key '{key}': a dataset is listed twice; list each once")
    if len(set(init_labels)) != len(inits):
        dup = sorted({x for x in init_labels if init_labels.count(x) > 1})
        errors.append(
            f"config key '{key}/inits': {', '.join(dup)} listed more than once; list each once, "
            "or give each entry a distinct 'label' (it names the runs)"
        )
    for i, m in enumerate(models):
        for it in m.get("inits", []):
            if it not in {x["name"] for x in inits} | set(init_labels):
                errors.append(
                    f"config key '{key}/models/{i}/inits': '{it}' is not among the study's "
                    f"inits ({', '.join(init_labels)})"
                )
    inputs = _inputs(key, s, errors)
    if isinstance(s["normalize"], dict):
        for d in s["datasets"]:
            norm = s["normalize"].get(d)
            channels = inputs.get(d, {}).get("channels")
            if channels is None and d in catalog.DATASETS:
                channels = catalog.DATASETS[d].channels
            if d not in s["normalize"]:
                errors.append(
                    f"config key '{key}/normalize': nothing for dataset '{d}' (give per dataset "
                    "{mean, std}, true for the training split's statistics or false for pixels "
                    "in [0, 1])"
                )
            elif (
                isinstance(norm, dict)
                and channels is not None
                and any(len(norm[k]) != channels for k in ("mean", "std"))
            ):
                after = f" (after inputs/{d}/channels)" if d in inputs else ""
                errors.append(
                    f"config key '{key}/normalize/{d}': give {channels} value(s) for mean and "
                    f"for std, one per channel of the images{after}"
                )
    ckpt = s.get("checkpoint") or {}
    every_epochs, every_steps = ckpt.get("every_epochs"), ckpt.get("every_steps")
    if every_epochs is None and every_steps is None:
        errors.append(
            f"config key '{key}/checkpoint': set every_epochs and/or every_steps "
            "(the init and the final weights are always saved)"
        )
    if errors:
        return Study(name, {}, (), {})

    runs: dict[str, RunSpec] = {}
    measures = dict(s["measures"])
    if not measures.get("exclude", True):
        del measures["exclude"]  # [] = the default: every parameter
    for m, d, (init, options), o, seed in itertools.product(
        models, s["datasets"], list(zip(inits, init_options, strict=True)), optimizers, s["seeds"]
    ):
        it = _init_label(init)
        if "inits" in m and init["name"] not in m["inits"] and it not in m["inits"]:
            continue  # this model takes only some of the study's inits
        source = init.get("run")
        if source is not None and "/" not in source:
            source = f"{name}/{source}"
        opt_name = o["name"]
        opt = dict(catalog.OPTIMIZERS[opt_name].defaults)
        for k in ("lr", "weight_decay"):
            if k in s:
                opt[k] = s[k]
        opt.update({k: v for k, v in o.items() if k not in ("name", "label")})
        for k in ("lr", "weight_decay"):
            if k in m:
                opt[k] = m[k]
        epochs = m.get("epochs", s["epochs"])
        batch_size = m.get("batch_size", s["batch_size"])
        model_label = m.get("label", m["name"])
        opt_label = o.get("label", opt_name)
        run_id = f"{model_label}_{d}_{it}_{opt_label}_s{seed}"
        ds = catalog.DATASETS[d]
        steps_per_epoch = -(-ds.train_size // batch_size)
        if batch_size > ds.train_size:
            errors.append(
                f"config key '{key}/batch_size': {batch_size} is larger than the {ds.train_size} "
                f"training images of '{d}'; use at most {ds.train_size}"
            )
        if every_epochs is not None and every_epochs > epochs:
            errors.append(
                f"config key '{key}/checkpoint/every_epochs': {every_epochs} never fires in "
                f"{epochs} epochs (model {model_label} on {d}); use a value <= {epochs}"
            )
        if every_steps is not None and every_steps > steps_per_epoch * epochs:
            errors.append(
                f"config key '{key}/checkpoint/every_steps': {every_steps} never fires in the "
                f"{steps_per_epoch * epochs} steps of model {model_label} on {d}; use a smaller value"
            )
        if run_id in runs:
            errors.append(f"config key '{key}': two grid points share the run id {run_id}")
        runs[run_id] = RunSpec(
            study=name,
            run_id=run_id,
            model=model_label,
            model_name=m["name"],
            model_settings={k: m[k] for k in MODEL_SETTINGS if k in m},
            shortcut=catalog.MODELS[m["name"]].shortcut,
            dataset=d,
            init=it,
            init_name=init["name"],
            init_source=source,
            optimizer=opt_label,
            optimizer_name=opt_name,
            optimizer_settings=opt,
            seed=seed,
            epochs=epochs,
            batch_size=batch_size,
            eval_batch_size=s["eval_batch_size"],
            schedule=s["schedule"],
            normalize=(s["normalize"][d] if isinstance(s["normalize"], dict) else s["normalize"]),
            augment=s["augment"],
            checkpoint_every_epochs=every_epochs,
            checkpoint_every_steps=every_steps,
            precision=s["precision"],
            compile=s["compile"],
            gradients_every_steps=s["gradients"].get("every_steps"),
            track_grad_reached=s["gradients"]["track_reached"],
            measures=dict(measures),
            init_options=options,
            inputs=inputs.get(d, {}),
        )
    runs.update(_branches(key, runs, s, errors))
    return Study(
        name,
        runs,
        tuple(s["datasets"]),
        dict(s["figures"]),
        keep_step_checkpoints=ckpt.get("keep_steps", True),
        features=dict(s["features"]),
        gradients=dict(s["gradients"]),
        similarity_pairs=_pairs(runs, s["similarity"]["pairs"]),
    )


def _branches(key: str, runs: dict[str, RunSpec], s: dict[str, Any], errors: list[str]):
    """A perturb-and-retrain branch of every run for every perturbation of the study."""
    from .perturb import validate_perturbation

    out: dict[str, RunSpec] = {}
    labels = []
    for i, entry in enumerate(s["perturbations"]):
        options = {k: v for k, v in entry.items() if k not in ("name", "label")}
        try:
            validate_perturbation(entry["name"], options)
        except ValueError as e:
            errors.append(f"config key '{key}/perturbations/{i}': {e}")
            continue
        label = entry.get("label", entry["name"].replace("_", "-"))
        labels.append(label)
        for run in runs.values():
            branch = f"{run.run_id}_{label}"
            out[branch] = RunSpec(**{
                **run.to_dict(),
                "run_id": branch,
                "seed": run.seed + s["perturb_seed_offset"],
                "init_name": "perturbed",
                "init_source": f"{run.study}/{run.run_id}",
                "perturbation": label,
                "perturbation_options": {"name": entry["name"], **options},
            })  # fmt: skip
    if len(set(labels)) != len(labels):
        errors.append(f"config key '{key}/perturbations': give each entry a distinct 'label'")
    return out


def _pairs(runs: dict[str, RunSpec], kinds: list[str]) -> tuple[tuple[str, str, str], ...]:
    """Pairs of runs to compare: same model and dataset, differing in exactly one of seed,
    init, optimizer (when that kind is asked for); and each branch with its original."""
    axes = {"seeds": "seed", "inits": "init", "optimizers": "optimizer"}
    base = [r for r in runs.values() if not r.perturbation]
    pairs = []
    for i, a in enumerate(base):
        for b in base[i + 1 :]:
            if (a.model, a.dataset) != (b.model, b.dataset):
                continue
            diff = [k for k, f in axes.items() if getattr(a, f) != getattr(b, f)]
            if len(diff) == 1 and diff[0] in kinds:
                pairs.append((a.run_id, b.run_id, diff[0]))
    if "perturbations" in kinds:
        for r in runs.values():
            if r.perturbation:
                pairs.append((r.init_source.split("/", 1)[1], r.run_id, "perturbations"))
    return tuple(pairs)


def load_studies(config: dict[str, Any], schema: Path | str = DEFAULT_SCHEMA) -> dict[str, Study]:
    """Validate ``config`` (in place: schema defaults are filled in) and expand the selected
    studies into runs. Raises :class:`ConfigError` listing every mistake found."""
    if not isinstance(config, dict) or not config:
        raise ConfigError(
            "the config is empty: give a config.yaml with a 'studies' mapping (see README)"
        )
    validate_schema(config, schema)
    errors: list[str] = []
    selected = config.get("run") or list(config["studies"])
    if isinstance(selected, str):
        selected = [selected]
    for name in selected:
        if name not in config["studies"]:
            errors.append(
                f"config key 'run': no study named '{name}'. Studies in this config: "
                f"{', '.join(config['studies'])}"
            )
    studies = {}
    for name in selected:
        if name in config["studies"]:
            resolved, study = _variant(config, name, schema)
            studies[resolved] = _with_claims(
                _resolve_study(resolved, study, errors), study, config, name, errors
            )
    _check_sources(config, studies, errors, schema)
    if not config["download"]:
        used = sorted({d for s in studies.values() for d in s.datasets})
        for d in used:
            missing = missing_files(d, config["data_dir"])
            if missing:
                errors.append(
                    f"config key 'download': false, but dataset '{d}' is not in data_dir "
                    f"'{config['data_dir']}' (missing {missing[0]}). Place torchvision's files "
                    "there, point data_dir at them, or set download: true"
                )
    errors = list(dict.fromkeys(errors))  # one grid problem shows once, not once per run
    if errors:
        raise ConfigError(
            "the config has {} problem{}:\n  - {}".format(
                len(errors), "s" * (len(errors) > 1), "\n  - ".join(errors)
            )
        )
    return studies


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
    import copy

    merged = {**copy.deepcopy(study), **copy.deepcopy(study["variants"][variant])}
    merged.pop("variants")
    try:
        validate_schema({"studies": {f"{name}-{variant}": merged}}, schema)
    except ConfigError as e:
        raise ConfigError(f"variant '{variant}' of study '{name}': {e}") from None
    return merged


def _check_sources(
    config: dict[str, Any], studies: dict[str, Study], errors: list[str], schema
) -> None:
    """Each from_run init names a run that exists, with the same model; a study that is not
    selected but holds such a run is resolved too (not a target: its runs train as needed),
    under the config's variant like the others."""
    import dataclasses

    for study in list(studies.values()):
        for run_id, run in list(study.runs.items()):
            if run.init_source is None:
                continue
            src_study, _, src_run = run.init_source.partition("/")
            if src_study in config["studies"] and src_study != study.name:
                resolved, raw = _variant(config, src_study, schema)
                if resolved not in studies:
                    extra = _resolve_study(resolved, raw, errors)
                    studies[resolved] = Study(**{**extra.__dict__, "target": False})
                if resolved != src_study:
                    src_study = resolved
                    run = dataclasses.replace(run, init_source=f"{resolved}/{src_run}")
                    study.runs[run_id] = run
            source = studies.get(src_study, Study("", {}, (), {})).runs.get(src_run)
            if source is None:
                errors.append(
                    f"config key 'studies/{study.name}/inits': from_run names no run "
                    f"'{run.init_source}' (give [<study>/]<run_id> of a run in this config)"
                )
            elif (source.model_name, source.model_settings) != (run.model_name, run.model_settings):
                errors.append(
                    f"config key 'studies/{study.name}/inits': run {run.run_id} (model "
                    f"{run.model}) cannot start from {run.init_source} (model {source.model}); "
                    "from_run needs the same model"
                )
            elif run.init_source == f"{study.name}/{run.run_id}":
                errors.append(
                    f"config key 'studies/{study.name}/inits': {run.run_id} starts from itself"
                )


# --- claims ------------------------------------------------------------------------------


def _run_value(run: RunSpec, column: str) -> str:
    return getattr(run, column)


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
    vocab: dict[str, set[str]] = {c: set() for c in catalog.CLAIM_COLUMNS}
    vocab["perturbation"].add("")
    for s in forms:
        for m in (_entry(x) for x in s.get("models", [])):
            vocab["model"].add(m.get("label", m["name"]))
            vocab["model_name"].add(m["name"])
            if m["name"] in catalog.MODELS:
                vocab["shortcut"].add(catalog.MODELS[m["name"]].shortcut)
        vocab["dataset"].update(s.get("datasets", []))
        vocab["init"].update(_init_label(_entry(x)) for x in s.get("inits", []))
        vocab["optimizer"].update(
            o.get("label", o["name"]) for o in (_entry(x) for x in s.get("optimizers", []))
        )
        vocab["perturbation"].update(
            p.get("label", p["name"].replace("_", "-")) for p in s.get("perturbations", [])
        )
    return vocab


def _check_param(where: str, p: catalog.ClaimParam, value: Any, vocab, errors: list[str]):
    cols = ", ".join(catalog.CLAIM_COLUMNS)
    if p.kind == "filter":
        if not isinstance(value, dict):
            errors.append(f"config key '{where}': give a mapping {{column: value or [values]}}")
            return
        for col, v in value.items():
            if col not in catalog.CLAIM_COLUMNS:
                errors.append(f"config key '{where}/{col}': unknown column; columns: {cols}")
                continue
            values = v if isinstance(v, list) else [v]
            for x in values:
                if not isinstance(x, str) or x not in vocab[col]:
                    known = ", ".join(repr(k) for k in sorted(vocab[col]))
                    errors.append(
                        f"config key '{where}/{col}': {x!r} is no {col} of this study or its "
                        f"variants ({known})"
                    )
    elif p.kind == "columns":
        if not isinstance(value, list) or any(c not in catalog.CLAIM_COLUMNS for c in value):
            errors.append(f"config key '{where}': give a list of columns among {cols}")
    elif p.kind == "choice":
        if value not in p.choices:
            errors.append(f"config key '{where}': {value!r} is not one of {', '.join(p.choices)}")
    elif p.kind == "bool":
        if not isinstance(value, bool):
            errors.append(f"config key '{where}': give true or false")
    elif p.kind == "string" and value is not None and not isinstance(value, str):
        errors.append(f"config key '{where}': give a string")


def _with_claims(
    study: Study, s: dict[str, Any], config: dict[str, Any], base: str, errors: list[str]
) -> Study:
    """``study`` with its claims validated against the registry of claim tests
    (catalog.CLAIM_TESTS), their params completed with the defaults, and a note on each
    claim that this variant's runs cannot test; plus min_accuracy and the models marked
    expect_failure (neither is a hyper-parameter: no run id or RunSpec changes)."""
    import dataclasses

    key = f"studies/{study.name}/claims"
    vocab = _vocabulary(config, base)
    claims, ids = [], set()
    for i, c in enumerate(s.get("claims", [])):
        where, n_errors = f"{key}/{i}", len(errors)
        if c["id"] in ids:
            errors.append(f"config key '{where}/id': claim id '{c['id']}' is used twice")
        ids.add(c["id"])
        test = catalog.CLAIM_TESTS.get(c["test"])
        if test is None:
            errors.append(
                f"config key '{where}/test': unknown claim test '{c['test']}'. Valid claim "
                f"tests: {catalog.describe(catalog.CLAIM_TESTS)}"
            )
            continue
        given = c.get("params") or {}
        params = {}
        for k in given:
            if k not in test.params:
                errors.append(
                    f"config key '{where}/params/{k}': test '{test.name}' has no parameter "
                    f"'{k}' (its parameters: {', '.join(test.params)})"
                )
        for k, p in test.params.items():
            if k not in given:
                if p.required:
                    errors.append(
                        f"config key '{where}/params': test '{test.name}' needs '{k}' ({p.doc})"
                    )
                params[k] = p.default
                continue
            _check_param(f"{where}/params/{k}", p, given[k], vocab, errors)
            params[k] = given[k]
        for k in ("branch", "control"):
            if k in test.params and params.get(k) not in (None, *vocab["perturbation"]):
                known = ", ".join(sorted(vocab["perturbation"] - {""})) or "none"
                errors.append(
                    f"config key '{where}/params/{k}': no perturbation labelled "
                    f"'{params[k]}' in this study or its variants (labels: {known})"
                )
        if test.name == "gradient_ratio" and not s["gradients"].get("every_steps"):
            errors.append(
                f"config key '{where}': test gradient_ratio needs gradient records: set "
                f"gradients.every_steps in study '{study.name}' (or override its claims)"
            )
        needs_masks = test.name == "share_unchanged" and params["measure"].startswith("never")
        if needs_masks and not s["gradients"]["track_reached"]:
            errors.append(
                f"config key '{where}/params/measure': '{params['measure']}' needs "
                f"gradients.track_reached: true in study '{study.name}'"
            )
        claims.append({
            "id": c["id"], "statement": c["statement"], "test": test.name, "params": params,
            "threshold": float(c["threshold"]), "expect": c["expect"],
            "note": _untested(study, test.name, params) if len(errors) == n_errors else "",
        })  # fmt: skip
    models = [_entry(m) for m in s["models"]]
    return dataclasses.replace(
        study,
        claims=tuple(claims),
        min_accuracy=s.get("min_accuracy"),
        expect_failure=tuple(m.get("label", m["name"]) for m in models if m.get("expect_failure")),
    )


def _untested(study: Study, test: str, params: dict[str, Any]) -> str:
    """Why the runs of ``study`` cannot test a claim ('' when they can)."""
    if not study.runs:
        return ""
    runs = list(study.runs.values())
    where = params.get("where") or {}
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


def missing_files(dataset: str, data_dir: Path | str) -> list[str]:
    """The native files of a downloadable dataset that are not in ``data_dir``."""
    root = Path(data_dir)
    return [
        str(root / f)
        for f in catalog.DATASETS[dataset].files
        if not (root / f).is_file() and not (root / f"{f}.gz").is_file()
    ]


def detect_device(requested: str) -> str:
    """'cuda' or 'cpu' without importing torch: 'auto' means CUDA when an NVIDIA device
    node is visible to this process (set ``device: cuda`` for clusters whose login nodes
    have no GPU)."""
    if requested != "auto":
        return requested
    return "cuda" if Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists() else "cpu"
