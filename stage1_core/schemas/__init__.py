"""JSON schemas of every artifact Stage-1 Pro writes (loaded by stage1_core.artifacts)."""
