# paramdyn: train grids of image classifiers and measure how their parameters move.
# A table of contents: the rules live in rules/, their code in src/paramdyn (one module per
# concept), reached through the thin scripts in scripts/.
from pathlib import Path

from snakemake.utils import min_version

from paramdyn.config import load_studies

min_version("9.0")


configfile: "config.yaml"


# Types and keys (schemas/config.schema.yaml, through snakemake.utils.validate), then names
# and cross-field rules; any mistake stops here, before a single job starts.
STUDIES = load_studies(
    config, Path(workflow.basedir) / "schemas" / "config.schema.yaml"
)


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/measures.smk"
include: "rules/features.smk"
include: "rules/plots.smk"
include: "rules/basins.smk"
include: "rules/analyses.smk"
include: "rules/findings.smk"


rule all:
    default_target: True
    input:
        study_targets(),
