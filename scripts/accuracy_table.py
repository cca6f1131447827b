"""Snakemake script of rule 'accuracy_table': see paramdyn.jobs.accuracy_table."""

from paramdyn.jobs import accuracy_table

accuracy_table(snakemake)
