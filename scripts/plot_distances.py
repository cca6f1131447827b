"""Snakemake script of rule(s) 'plot_distances': see paramdyn.jobs.plot_distances."""

from paramdyn.jobs import plot_distances

plot_distances(snakemake)
