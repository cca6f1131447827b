"""Snakemake script of rule 'similarity': see paramdyn.jobs.similarity."""

from paramdyn.jobs import similarity

similarity(snakemake)
