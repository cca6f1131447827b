"""Snakemake script of rule(s) 'distances': see paramdyn.jobs.distances."""

from paramdyn.jobs import distances

distances(snakemake)
