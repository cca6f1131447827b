"""Snakemake script of rule(s) 'train': see paramdyn.jobs.train."""

from paramdyn.jobs import train

train(snakemake)
