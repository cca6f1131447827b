"""Snakemake script of rule(s) 'aggregate': see paramdyn.jobs.aggregate."""

from paramdyn.jobs import aggregate

aggregate(snakemake)
