"""Snakemake script of rule 'features': see paramdyn.jobs.features."""

from paramdyn.jobs import features

features(snakemake)
