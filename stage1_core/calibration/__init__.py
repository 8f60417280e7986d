"""Calibration on val_calib: exact binomial bounds and the certified softmax exit threshold."""

from __future__ import annotations

from .bounds import binomial_pvalue, fnr_upper_bound, positives_needed
from .threshold_sweep import CertificationResult, certify_softmax_threshold, thresholds_document

__all__ = [
    "CertificationResult",
    "binomial_pvalue",
    "certify_softmax_threshold",
    "fnr_upper_bound",
    "positives_needed",
    "thresholds_document",
]
