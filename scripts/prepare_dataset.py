"""Snakemake script of rule(s) 'prepare_dataset': see paramdyn.jobs.prepare_dataset."""

from paramdyn.jobs import prepare_dataset

prepare_dataset(snakemake)
