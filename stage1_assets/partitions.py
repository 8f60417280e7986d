"""Phase partitions: one partition per risk-ordered phase of ``stage1_core.phases``."""

import dagster as dg

from stage1_core.phases import PHASE_KEYS

phases = dg.StaticPartitionsDefinition(PHASE_KEYS)
