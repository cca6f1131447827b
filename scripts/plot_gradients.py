"""Snakemake script of rule 'plot_gradients': see paramdyn.jobs.plot_gradients."""

from paramdyn.jobs import plot_gradients

plot_gradients(snakemake)
