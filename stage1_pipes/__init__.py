"""The Dagster Pipes side of a ``torchrun`` job: the external process a Dagster asset launches.

It imports ``dagster_pipes`` (the small, dependency-free protocol package) and ``stage1_core``,
never ``dagster``: ``stage1_assets`` imports dagster at package import, which every rank would
pay for, and ``stage1_core`` stays free of any orchestrator package.
"""
