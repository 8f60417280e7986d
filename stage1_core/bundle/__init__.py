"""Deploy bundle: export (manifest, checksums, README), verification and loading, the predictor."""

from stage1_core.bundle.export import code_version, export_bundle, render_readme
from stage1_core.bundle.load import (
    BundleError,
    Stage1Bundle,
    eval_transform_from_description,
    format_prediction,
    verify_bundle,
)
from stage1_core.bundle.predictor import Stage1Predictor, load_image

__all__ = [
    "BundleError",
    "Stage1Bundle",
    "Stage1Predictor",
    "code_version",
    "eval_transform_from_description",
    "export_bundle",
    "format_prediction",
    "load_image",
    "render_readme",
    "verify_bundle",
]
