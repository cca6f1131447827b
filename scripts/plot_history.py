"""Snakemake script of rule(s) 'plot_history': see paramdyn.jobs.plot_history."""

from paramdyn.jobs import plot_history

plot_history(snakemake)
