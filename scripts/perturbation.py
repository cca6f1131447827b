"""Snakemake script of rule 'perturbation': see paramdyn.jobs.perturbation."""

from paramdyn.jobs import perturbation

perturbation(snakemake)
