"""Snakemake script of rule 'plot_perturbations': see paramdyn.jobs.plot_perturbations."""

from paramdyn.jobs import plot_perturbations

plot_perturbations(snakemake)
