"""Snakemake script of rule(s) 'plot_distance_steps': see paramdyn.jobs.plot_distance_steps."""

from paramdyn.jobs import plot_distance_steps

plot_distance_steps(snakemake)
