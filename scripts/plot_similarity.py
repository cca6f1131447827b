"""Snakemake script of rule 'plot_similarity': see paramdyn.jobs.plot_similarity."""

from paramdyn.jobs import plot_similarity

plot_similarity(snakemake)
