"""Snakemake script of rule(s) 'download_dataset': see paramdyn.jobs.download_dataset."""

from paramdyn.jobs import download_dataset

download_dataset(snakemake)
