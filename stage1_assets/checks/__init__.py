"""Blocking, phase-partitioned asset checks: one per gate criterion of ``stage1_core.phases``."""
