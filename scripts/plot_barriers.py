"""Snakemake script of rule(s) 'plot_barriers': see paramdyn.jobs.plot_barriers."""

from paramdyn.jobs import plot_barriers

plot_barriers(snakemake)
