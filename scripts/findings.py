"""Snakemake script of rule 'findings': see paramdyn.jobs.findings."""

from paramdyn.jobs import findings

findings(snakemake)
