"""Snakemake script of rule(s) 'interpolate': see paramdyn.jobs.interpolate."""

from paramdyn.jobs import interpolate

interpolate(snakemake)
