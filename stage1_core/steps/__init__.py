"""Phase-agnostic pipeline steps, one module per concern (see :mod:`stage1_core.pipeline`)."""
