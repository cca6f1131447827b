"""Snakemake script of rules 'curvature', 'spectra', 'layer_grams': see paramdyn.jobs.analysis."""

from paramdyn.jobs import analysis

analysis(snakemake)
