"""Snakemake script of rule(s) 'plot_analysis': see paramdyn.jobs.plot_analysis."""

from paramdyn.jobs import plot_analysis

plot_analysis(snakemake)
