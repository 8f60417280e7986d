"""The code location's shape: the graph shows the data flow, groups follow it, one job per phase."""

from __future__ import annotations

import dagster as dg

from stage1_assets.definitions import defs
from stage1_assets.partitions import GROUPS, phase_job_name
from stage1_core.phases import PHASES

FLOW = ("dataset_index", "splits", "backbone", "cached_features", "checkpoint", "predictions", "exit_policy",
        "evaluation", "bundle")


def _graph() -> dg.AssetGraph:
    return defs.resolve_asset_graph()


def test_bundle_depends_on_what_it_packages_and_star_bundle_selects_a_whole_phase():
    graph = _graph()
    parents = {key.path[-1] for key in graph.get(dg.AssetKey("bundle")).parent_keys}
    assert parents == {"checkpoint", "exit_policy", "evaluation"}
    whole = dg.AssetSelection.from_coercible(["*bundle"]).resolve(graph)
    assert {key.path[-1] for key in whole} == set(FLOW)
    one_level = dg.AssetSelection.from_coercible(["+bundle"]).resolve(graph)
    assert {key.path[-1] for key in one_level} == {"checkpoint", "exit_policy", "evaluation", "bundle"}


def test_groups_are_named_and_ordered_for_the_flow():
    graph = _graph()
    groups = [graph.get(dg.AssetKey(name)).group_name for name in FLOW]
    assert set(groups) == set(GROUPS.values())
    assert groups == sorted(groups), "the UI lists groups alphabetically: their names must keep the flow's order"


def test_one_job_per_available_phase_with_exactly_its_gate_checks():
    repository = defs.get_repository_def()
    for recipe in PHASES.values():
        if not recipe.available:
            assert not repository.has_job(phase_job_name(recipe.key))
            continue
        job = repository.get_job(phase_job_name(recipe.key))
        assert {key.path[-1] for key in job.asset_layer.selected_asset_keys} == set(FLOW)
        nodes = {node.name for node in job.graph.nodes}
        assert nodes - set(FLOW) == {f"{c.asset}_{c.name}" for c in recipe.criteria}, recipe.key
        assert job.partitions_def is not None and recipe.key in job.partitions_def.get_partition_keys()
        assert recipe.key in (job.description or "")


def test_the_code_location_imports_no_heavy_library():
    """``dagster`` commands, the UI and every run start without torch & co.; steps load them on first use."""
    import subprocess
    import sys

    heavy = ("torch", "torchvision", "transformers", "scipy", "sklearn", "peft", "matplotlib")
    probe = ("import sys, stage1_assets.definitions; "
             f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"imported at code-location load: {loaded}"


def test_gpu_steps_share_the_gpu_pool():
    """backbone (ExPLoRA pre-training, phases 4-5), cached_features and checkpoint run one at a time."""
    from stage1_assets.assets import model

    for asset in (model.backbone, model.cached_features, model.checkpoint):
        assert asset.op.pool == "gpu", asset.key
