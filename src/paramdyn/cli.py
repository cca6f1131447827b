"""``paramdyn``: command-line helpers around the workflow.

    paramdyn disk [config.yaml] [--run STUDY ...]

prints, before anything runs, the checkpoint storage each study will need.

    paramdyn findings [config.yaml] [--run STUDY ...] [--variant VARIANT]

prints the verdict table of each study's findings (results/<study>/findings.parquet).

    paramdyn snakemake [SNAKEMAKE ARGS ...]

runs this environment's ``snakemake`` with those arguments under the directory lock of
:mod:`paramdyn.runlock`: a run killed before (SIGKILL, a power cut) leaves no lock that
stops it, and a second run while one is alive in the directory is refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from .config import DEFAULT_SCHEMA, ConfigError, load_studies


def checkpoint_bytes(model_name: str, dataset: str, settings: dict, inputs=None) -> int:
    """Size of one checkpoint: every state_dict tensor (built on the meta device, so no
    memory is used), plus a header allowance. ``inputs``: the run's input transform."""
    import torch

    from .models import build_model

    with torch.device("meta"):
        model = build_model(model_name, dataset, settings, inputs)
    sd = model.state_dict()
    return sum(t.numel() * t.element_size() for t in sd.values()) + 256 * len(sd) + 4096


def disk_table(config: dict) -> list[dict]:
    rows, sizes = [], {}
    for name, study in load_studies(config, DEFAULT_SCHEMA).items():
        total = n_ckpt = step_ckpt = 0
        for spec in study.runs.values():
            key = (spec.model_name, spec.dataset, tuple(sorted(spec.model_settings.items())),
                   tuple(sorted(spec.inputs.items())))  # fmt: skip
            if key not in sizes:
                sizes[key] = checkpoint_bytes(
                    spec.model_name, spec.dataset, spec.model_settings, spec.inputs
                )
            steps = spec.checkpoint_steps()
            n_ckpt += len(steps)
            step_ckpt += sum(1 for s in steps if s % spec.steps_per_epoch)
            total += len(steps) * sizes[key]
        rows.append(
            {
                "study": name,
                "runs": len(study.runs),
                "checkpoints": n_ckpt,
                "of which mid-epoch": step_ckpt,
                "GB": total / 1e9,
            }
        )
    return rows


def print_findings(config: dict, results: Path) -> int:
    """Each selected study's verdict table, from its findings.parquet; 1 if one is missing."""
    from .findings import summary
    from .tables import read_parquet

    missing = 0
    for name, study in load_studies(config, DEFAULT_SCHEMA).items():
        if not study.target:
            continue
        path = results / name / "findings.parquet"
        print(f"== {name} ({path.parent / 'findings.md'})")
        if not path.is_file():
            print(f"  no {path}: build it with snakemake")
            missing += 1
            continue
        print(summary(read_parquet(path)))
    return 1 if missing else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["snakemake"]:  # every later argument is Snakemake's
        from . import runlock

        return runlock.main([str(Path(sys.executable).parent / "snakemake"), *argv[1:]])
    parser = argparse.ArgumentParser(prog="paramdyn", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    disk = sub.add_parser("disk", help="checkpoint storage each study will need")
    disk.add_argument("config", nargs="?", default="config.yaml", type=Path)
    disk.add_argument("--run", nargs="+", help="studies (default: the config's `run`)")
    found = sub.add_parser("findings", help="the verdict table of each study's findings")
    found.add_argument("config", nargs="?", default="config.yaml", type=Path)
    found.add_argument("--run", nargs="+", help="studies (default: the config's `run`)")
    found.add_argument("--variant", help="the variant (default: the config's `variant`)")
    found.add_argument("--results", default="results", type=Path, help="the results folder")
    sub.add_parser(
        "snakemake",
        help="snakemake ARGS under the directory lock (a killed run's locks are cleared)",
        add_help=False,
    )
    args = parser.parse_args(argv)
    config = yaml.safe_load(args.config.read_text())
    if args.run:
        config["run"] = args.run
    if args.command == "findings":
        if args.variant:
            config["variant"] = args.variant
        try:
            return print_findings(config, args.results)
        except ConfigError as e:
            print(f"{args.config}: {e}", file=sys.stderr)
            return 2
    try:
        rows = disk_table(config)
    except ConfigError as e:
        print(f"{args.config}: {e}", file=sys.stderr)
        return 2
    print(f"{'study':<20} {'runs':>6} {'checkpoints':>12} {'mid-epoch':>10} {'storage':>12}")
    for r in rows:
        print(
            f"{r['study']:<20} {r['runs']:>6} {r['checkpoints']:>12} "
            f"{r['of which mid-epoch']:>10} {r['GB']:>9.3f} GB"
        )
    print(
        f"{'total':<20} {sum(r['runs'] for r in rows):>6} "
        f"{sum(r['checkpoints'] for r in rows):>12} "
        f"{sum(r['of which mid-epoch'] for r in rows):>10} {sum(r['GB'] for r in rows):>9.3f} GB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
