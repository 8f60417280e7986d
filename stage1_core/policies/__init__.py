"""Exit policies: the :class:`ExitPolicy` interface, its implementations and their registry.

One module per policy holds all of it (fit, decide, certificate, evaluation extras, README
section, headline, settings). A new policy subclasses :class:`ExitPolicy` in its own module and
registers itself with :func:`register_policy` (a class decorator); the steps, the evaluation, the
bundle and the predictor look it up here by name and never change. Which phases may deploy it is
the phase table's ``exit_policies`` (``stage1_core/phases.py``).
"""

from __future__ import annotations

from .base import DEFERRED_SET, Decisions, ExitPolicy, FitInputs, FittedPolicy, SplitOutputs
from .registry import POLICIES, load_policy, policy_class, register_policy

# The built-in policies (each module registers its class on import).
from .gate import GateExitPolicy, fit_gate_policy, gateparams_document
from .scrc import SCRCExitPolicy
from .softmax import SoftmaxExitPolicy

__all__ = [
    "DEFERRED_SET",
    "Decisions",
    "ExitPolicy",
    "FitInputs",
    "FittedPolicy",
    "SplitOutputs",
    "SoftmaxExitPolicy",
    "GateExitPolicy",
    "SCRCExitPolicy",
    "fit_gate_policy",
    "gateparams_document",
    "POLICIES",
    "register_policy",
    "policy_class",
    "load_policy",
    "policy_file_names",
]



def policy_file_names() -> list[str]:
    """The policy file of every registered policy (the bundle schema's ``policy_file`` choices)."""
    return [cls.policy_file for cls in POLICIES.values()]
