"""Snakemake script of rule(s) 'layer_similarity': see paramdyn.jobs.layer_similarity."""

from paramdyn.jobs import layer_similarity

layer_similarity(snakemake)
