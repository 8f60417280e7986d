"""Dagster wiring of stage1_core: assets, phase-gate checks, resources and guards."""

import warnings

import dagster as dg

# Partitioned asset checks are a Dagster preview feature; its warning says nothing actionable here.
warnings.filterwarnings("ignore", category=dg.PreviewWarning)
