"""Snakemake script of rule 'plot_dynamics': see paramdyn.jobs.plot_dynamics."""

from paramdyn.jobs import plot_dynamics

plot_dynamics(snakemake)
