"""Parameter-efficient adaptation of a DINOv3 backbone: LoRA, DoRA (Hugging Face peft) and DoRAN.

Targets are the linear layers of the transformer blocks of a ``DINOv3ViTModel``
(``model.layer.{i}.attention.{q,k,v,o}_proj`` and ``model.layer.{i}.mlp.{up,down[,gate]}_proj``);
``blocks`` selects which blocks carry adapters (an int means the last N blocks). Every function
accepts the raw Hugging Face model, a :class:`~stage1_core.model.backbone.DINOv3Backbone` (whose
``.model`` is then adapted in place and the backbone returned) or, where it makes sense, an
already adapted ``PeftModel``.

LoRA and DoRA come from peft (``LoraConfig(..., layers_pattern="layer")``; peft has no default
target mapping for DINOv3, so the modules are listed). DoRAN has no public implementation; it is
written here as :class:`DoRANLinear`, a wrapper around ``nn.Linear``:

    W' = m * (W0 + s * B @ A) / (||W0 + s * B @ A||_row + tau),   s = alpha / r

* ``m`` (one value per output row) starts at ``||W0||_row + tau_init``, so at initialisation
  (``B = 0``) the layer computes exactly ``W0`` whatever ``tau_init``.
* ``tau`` is one learnable scalar per adapted layer, kept non-negative by a clamp at 0 (so
  ``tau = 0`` is reachable exactly and then the layer *is* DoRA). Its backward pass lets the
  gradient through whenever a descent step would move the raw value up, so a ``tau`` driven to
  0 is not stuck there (a plain clamp would zero its gradient for good).
* As in peft's DoRA (DoRA paper section 4.3), the row norm is detached in the forward pass:
  it is treated as a constant in backward and receives no gradient (``detach_norm=True``).
* ``A`` and ``B`` are either direct parameters (``generator=False``: LoRA-style init, ``B = 0``)
  or produced by a :class:`DoRANGenerator` shared by the adapted projections of a block that
  have the same shape (q, k, v, o share one; up and gate another; down its own). The generator
  input is a learned embedding per (projection, rank index); one hidden-layer MLP per factor maps
  it to the rows of ``A`` and the columns of ``B``. The last layer of the ``B`` network starts at
  zero, so ``B = 0`` and the output equals the base at initialisation.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DINOV3_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
GATED_TARGET = "gate_proj"
LAYERS_PATTERN = "layer"
_BLOCK_RE = re.compile(rf"(?:^|\.){LAYERS_PATTERN}\.(\d+)\.")
_PEFT_PREFIX = "base_model.model."

__all__ = [
    "DINOV3_TARGETS",
    "DoRANGenerator",
    "DoRANLinear",
    "adapted_module_names",
    "adapter_kind",
    "adapters_disabled",
    "apply_dora",
    "apply_doran",
    "apply_lora",
    "default_targets",
    "expected_adapter_modules",
    "merge_adapters",
    "num_blocks",
    "resolve_blocks",
    "trainable_parameter_report",
    "verify_peft",
]


def _is_backbone(model: nn.Module) -> bool:
    from stage1_core.model.backbone import DINOv3Backbone

    return isinstance(model, DINOv3Backbone)


def _is_peft_model(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a backbone / PeftModel (adapters, if any, are injected in it)."""
    if _is_backbone(model):
        model = model.model
    if _is_peft_model(model):
        model = model.base_model.model
    return model


def _hf_model_or_peft(model: nn.Module) -> nn.Module:
    """The model inside a backbone wrapper (a ``PeftModel`` stays a ``PeftModel``)."""
    return model.model if _is_backbone(model) else model


def _block_index(name: str) -> int | None:
    match = _BLOCK_RE.search(name + ".")
    return int(match.group(1)) if match else None


def num_blocks(model: nn.Module) -> int:
    """Number of transformer blocks (``config.num_hidden_layers``, else counted from module names)."""
    hf = _hf_model(model)
    config = getattr(hf, "config", None)
    if config is not None and getattr(config, "num_hidden_layers", None):
        return int(config.num_hidden_layers)
    indices = {_block_index(name) for name, _ in hf.named_modules()} - {None}
    if not indices:
        raise ValueError(f"{type(hf).__name__} has no '{LAYERS_PATTERN}.<i>' blocks")
    return max(indices) + 1


def resolve_blocks(model: nn.Module, blocks: Sequence[int] | int) -> list[int]:
    """Sorted block indices: an int ``N`` means the last N blocks; negative indices count from the end."""
    total = num_blocks(model)
    if isinstance(blocks, bool):
        raise TypeError("blocks must be an int or a sequence of ints, not a bool")
    if isinstance(blocks, int):
        if not 1 <= blocks <= total:
            raise ValueError(f"blocks={blocks}: the model has {total} blocks - choose 1..{total} last blocks")
        return list(range(total - blocks, total))
    chosen = set()
    for index in blocks:
        resolved = index + total if index < 0 else index
        if not 0 <= resolved < total:
            raise ValueError(f"block index {index} is out of range for a model with {total} blocks")
        chosen.add(int(resolved))
    if not chosen:
        raise ValueError("blocks is empty - select at least one block")
    return sorted(chosen)


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """:data:`DINOV3_TARGETS`, plus ``gate_proj`` when the model has a gated MLP."""
    hf = _hf_model(model)
    gated = any(name.rsplit(".", 1)[-1] == GATED_TARGET for name, _ in hf.named_modules())
    return DINOV3_TARGETS + ((GATED_TARGET,) if gated else ())


def expected_adapter_modules(model: nn.Module, targets: Sequence[str], blocks: Sequence[int]) -> list[str]:
    """Names (relative to the Hugging Face model) of the ``nn.Linear`` layers an adapter should wrap."""
    hf = _hf_model(model)
    wanted, chosen = set(targets), set(blocks)
    names = []
    for name, module in hf.named_modules():
        if isinstance(module, nn.Linear) and not isinstance(module, DoRANLinear):
            if name.rsplit(".", 1)[-1] in wanted and _block_index(name) in chosen:
                names.append(_strip(name))
    return sorted(names)


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _block_name(name: str) -> str:
    """``"model.layer.3"`` for ``"model.layer.3.attention.q_proj"``."""
    match = _BLOCK_RE.search(name + ".")
    if match is None:
        raise ValueError(f"{name!r} is not inside a '{LAYERS_PATTERN}.<i>' block")
    return name[: match.end() - 1]


def _strip(name: str) -> str:
    """Drop peft's ``base_layer`` component so wrapped and plain layers have the same name."""
    return name[: -len(".base_layer")] if name.endswith(".base_layer") else name


def _check_targets(model: nn.Module, targets: Sequence[str], blocks: Sequence[int]) -> list[str]:
    names = expected_adapter_modules(model, targets, blocks)
    present = {name.rsplit(".", 1)[-1] for name in names}
    missing = sorted(set(targets) - present)
    if missing:
        raise ValueError(
            f"target modules {missing} do not exist in blocks {list(blocks)} of {type(_hf_model(model)).__name__}; "
            f"available linear layers there: {sorted(present) or 'none'}"
        )
    return names


def apply_lora(
    model: nn.Module,
    r: int,
    blocks: Sequence[int] | int,
    alpha: float | None = None,
    dropout: float = 0.0,
    use_dora: bool = False,
    targets: Sequence[str] | None = None,
) -> nn.Module:
    """Wrap the ``targets`` linear layers of the selected blocks with peft LoRA (or DoRA).

    ``alpha`` defaults to ``r`` (scaling 1). Every base parameter is frozen; only adapter
    parameters train. The model is modified in place: a raw Hugging Face model comes back as a
    ``PeftModel``; a ``DINOv3Backbone`` comes back itself with ``.model`` replaced by the
    ``PeftModel`` (its ``forward``/``extract`` keep working).
    """
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise ValueError(f"r={r}: the LoRA rank must be >= 1")
    if adapter_kind(model) != "none":
        raise ValueError("the model already carries adapters - merge_adapters() it first")
    chosen = resolve_blocks(model, blocks)
    targets = tuple(targets) if targets is not None else default_targets(model)
    _check_targets(model, targets, chosen)
    config = LoraConfig(
        r=int(r),
        lora_alpha=float(alpha if alpha is not None else r),
        lora_dropout=float(dropout),
        use_dora=bool(use_dora),
        target_modules=list(targets),
        layers_to_transform=chosen,
        layers_pattern=LAYERS_PATTERN,
        bias="none",
    )
    target = model.model if _is_backbone(model) else model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(target, config)
    if _is_backbone(model):
        model.model = peft_model
        model._fingerprint = None
        return model
    return peft_model


def apply_dora(
    model: nn.Module,
    r: int,
    blocks: Sequence[int] | int,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: Sequence[str] | None = None,
) -> nn.Module:
    """:func:`apply_lora` with ``use_dora=True`` (magnitude per output row, detached row norm)."""
    return apply_lora(model, r, blocks, alpha=alpha, dropout=dropout, use_dora=True, targets=targets)


class _NonNegative(torch.autograd.Function):
    """``clamp(x, min=0)`` whose gradient is blocked only where it would push ``x`` further below 0."""

    @staticmethod
    def forward(ctx: Any, raw: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(raw)
        return raw.clamp_min(0.0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (raw,) = ctx.saved_tensors
        return torch.where((raw >= 0) | (grad < 0), grad, torch.zeros_like(grad))


class DoRANGenerator(nn.Module):
    """Produces the low-rank factors of several same-shape projections of one block.

    Each (slot, rank index) has a learned embedding for ``A`` and one for ``B``; two small MLPs
    (``embed_dim -> hidden_dim -> in_features`` and ``-> out_features``), shared by all slots,
    map them to the rows of ``A`` ``[r, in]`` and the columns of ``B`` ``[out, r]``. The last layer
    of the ``B`` network is zero-initialised, so ``B = 0`` at the start.
    """

    def __init__(
        self,
        slots: Sequence[str],
        in_features: int,
        out_features: int,
        r: int,
        embed_dim: int = 32,
        hidden_dim: int = 64,
    ) -> None:
        super().__init__()
        self.slots = tuple(slots)
        self.r = int(r)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.embed_a = nn.Parameter(torch.randn(len(self.slots), r, embed_dim))
        self.embed_b = nn.Parameter(torch.randn(len(self.slots), r, embed_dim))
        self.net_a = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, in_features))
        self.net_b = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_features))
        with torch.no_grad():
            nn.init.zeros_(self.net_b[-1].weight)
            nn.init.zeros_(self.net_b[-1].bias)
            # Rescale the A network so A's entries have the spread of peft's default LoRA init
            # (kaiming-uniform with a = sqrt(5), i.e. std 1 / sqrt(3 * in_features)).
            self.net_a[-1].bias.zero_()
            spread = self.net_a(self.embed_a.reshape(-1, embed_dim)).std().clamp_min(1e-12)
            self.net_a[-1].weight.mul_(1.0 / (math.sqrt(3.0 * in_features) * spread))

    def forward(self, slot: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [r, in], B [out, r])`` for ``slot``."""
        index = self.slots.index(slot)
        a = self.net_a(self.embed_a[index])
        b = self.net_b(self.embed_b[index]).transpose(0, 1)
        return a, b


class DoRANLinear(nn.Module):
    """DoRA with a learnable non-negative stabiliser ``tau`` and optionally generated factors.

    ``forward(x) = m / (||W0 + s B A||_row + tau) * (x W0^T + s x A^T B^T) + b``; with ``tau = 0``
    and direct ``A``, ``B`` this is peft's DoRA. ``disabled = True`` runs the frozen base layer.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        alpha: float | None = None,
        tau_init: float = 0.0,
        dropout: float = 0.0,
        generator: DoRANGenerator | None = None,
        slot: str | None = None,
        detach_norm: bool = True,
    ) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"r={r}: the DoRAN rank must be >= 1")
        if tau_init < 0:
            raise ValueError(f"tau_init={tau_init}: the stabiliser must be >= 0")
        self.base_layer = base_layer
        for param in base_layer.parameters():
            param.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r = int(r)
        self.scaling = float(alpha if alpha is not None else r) / self.r
        self.detach_norm = bool(detach_norm)
        self.disabled = False
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        if generator is None:
            self.lora_a = nn.Parameter(torch.empty(self.r, self.in_features, **factory))
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
            self.lora_b = nn.Parameter(torch.zeros(self.out_features, self.r, **factory))
        else:
            if slot not in generator.slots:
                raise ValueError(f"slot {slot!r} is not one of the generator's slots {generator.slots}")
            if (generator.in_features, generator.out_features, generator.r) != (self.in_features, self.out_features, self.r):
                raise ValueError("generator shape or rank does not match the base layer")
            self.lora_a = None
            self.lora_b = None
        # Not registered as a submodule: the generator is owned (and saved) by its block.
        object.__setattr__(self, "_generator", generator)
        self.slot = slot
        with torch.no_grad():
            row_norm = torch.linalg.norm(weight.detach().float(), dim=1).to(weight.dtype)
        self.magnitude = nn.Parameter(row_norm + float(tau_init))
        self.tau_raw = nn.Parameter(torch.tensor(float(tau_init), **factory))

    @property
    def generator(self) -> DoRANGenerator | None:
        return self._generator

    @property
    def tau(self) -> torch.Tensor:
        """The stabiliser, ``max(tau_raw, 0)``."""
        return _NonNegative.apply(self.tau_raw)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [r, in], B [out, r])``: direct parameters or the generator's output."""
        if self._generator is None:
            return self.lora_a, self.lora_b
        return self._generator(self.slot)

    def _row_scale(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        weight = self.base_layer.weight
        adapted = weight + self.scaling * (b.detach() @ a.detach() if self.detach_norm else b @ a)
        norm = torch.linalg.norm(adapted, dim=1)
        if self.detach_norm:
            norm = norm.detach()
        return self.magnitude / (norm + self.tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x)
        a, b = self.factors()
        weight = self.base_layer.weight
        a, b = a.to(x.dtype), b.to(x.dtype)
        low_rank = F.linear(F.linear(self.dropout(x), a), b) * self.scaling
        out = self._row_scale(a, b).to(x.dtype) * (F.linear(x, weight.to(x.dtype)) + low_rank)
        if self.base_layer.bias is not None:
            out = out + self.base_layer.bias.to(x.dtype)
        return out

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``m / (||W0 + s B A|| + tau) * (W0 + s B A)``, the weight of the equivalent plain layer."""
        a, b = self.factors()
        weight = self.base_layer.weight
        scale = self._row_scale(a, b)
        return (scale.unsqueeze(1) * (weight + self.scaling * (b @ a))).to(weight.dtype)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing what this layer computes (adapters merged)."""
        weight = self.base_layer.weight
        layer = nn.Linear(
            self.in_features, self.out_features, bias=self.base_layer.bias is not None,
            device=weight.device, dtype=weight.dtype,
        )
        layer.weight.copy_(self.merged_weight())
        if self.base_layer.bias is not None:
            layer.bias.copy_(self.base_layer.bias)
        layer.requires_grad_(False)
        return layer

    def extra_repr(self) -> str:
        mode = "generated" if self._generator is not None else "direct"
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}, factors={mode}"


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def apply_doran(
    model: nn.Module,
    r: int,
    blocks: Sequence[int] | int,
    tau_init: float = 0.0,
    generator: bool = True,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: Sequence[str] | None = None,
    embed_dim: int = 32,
    hidden_dim: int = 64,
    detach_norm: bool = True,
) -> nn.Module:
    """Replace the target linear layers of the selected blocks by :class:`DoRANLinear` (in place).

    Every other parameter is frozen. With ``generator=True`` each block gets one
    :class:`DoRANGenerator` per distinct (in, out) shape among its targets, stored on the block as
    ``doran_generators``. Returns ``model`` (a backbone stays a backbone).
    """
    if adapter_kind(model) != "none":
        raise ValueError("the model already carries adapters - merge_adapters() it first")
    hf = _hf_model(model)
    chosen = resolve_blocks(model, blocks)
    targets = tuple(targets) if targets is not None else default_targets(model)
    names = _check_targets(model, targets, chosen)
    for param in hf.parameters():
        param.requires_grad_(False)
    by_block: dict[str, list[str]] = {}
    for name in names:
        by_block.setdefault(_block_name(name), []).append(name)
    for block_name, layer_names in by_block.items():
        generators: dict[str, DoRANGenerator] = {}
        if generator:
            groups: dict[tuple[int, int], list[str]] = {}
            for name in layer_names:
                base = hf.get_submodule(name)
                groups.setdefault((base.in_features, base.out_features), []).append(name)
            holder = nn.ModuleDict()
            for (fan_in, fan_out), members in groups.items():
                ref = hf.get_submodule(members[0]).weight
                shared = DoRANGenerator([_short(m) for m in members], fan_in, fan_out, r, embed_dim, hidden_dim)
                holder[f"in{fan_in}_out{fan_out}"] = shared.to(ref.device, ref.dtype)
                generators.update({member: shared for member in members})
            hf.get_submodule(block_name).doran_generators = holder
        for name in layer_names:
            wrapped = DoRANLinear(
                hf.get_submodule(name), r, alpha=alpha, tau_init=tau_init, dropout=dropout,
                generator=generators.get(name), slot=_short(name) if generator else None, detach_norm=detach_norm,
            )
            _set_submodule(hf, name, wrapped)
    hf.doran_spec = {"targets": list(targets), "blocks": chosen, "r": int(r), "generator": bool(generator)}
    if _is_backbone(model):
        model._fingerprint = None
    return model


def adapter_kind(model: nn.Module) -> str:
    """``"lora"``, ``"dora"``, ``"doran"`` or ``"none"``."""
    inner = _hf_model_or_peft(model)
    if _is_peft_model(inner):
        config = next(iter(inner.peft_config.values()))
        return "dora" if getattr(config, "use_dora", False) else "lora"
    if any(isinstance(m, DoRANLinear) for m in inner.modules()):
        return "doran"
    return "none"


def adapted_module_names(model: nn.Module) -> list[str]:
    """Names (relative to the Hugging Face model) of the layers that carry an adapter."""
    from peft.tuners.lora import LoraLayer

    hf = _hf_model(model)
    return sorted(name for name, m in hf.named_modules() if isinstance(m, (LoraLayer, DoRANLinear)))


def _is_adapter_parameter(name: str) -> bool:
    parts = name.split(".")
    if "base_layer" in parts:
        return False
    return any(p.startswith("lora_") for p in parts) or "doran_generators" in parts or parts[-1] in ("magnitude", "tau_raw")


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the model with every adapter switched off (peft ``disable_adapter`` / DoRAN flag)."""
    inner = _hf_model_or_peft(model)
    if _is_peft_model(inner):
        with inner.disable_adapter():
            yield model
        return
    layers = [m for m in inner.modules() if isinstance(m, DoRANLinear)]
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, state in zip(layers, previous):
            layer.disabled = state


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into plain ``nn.Linear`` weights and return the plain model.

    peft adapters go through ``merge_and_unload()``; DoRAN layers are replaced by
    :meth:`DoRANLinear.to_linear` and the block generators removed. A backbone is merged in place
    and returned; otherwise the (unwrapped) Hugging Face model is returned.
    """
    inner = _hf_model_or_peft(model)
    if _is_peft_model(inner):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            merged = inner.merge_and_unload()
    else:
        merged = inner
        for name, module in list(merged.named_modules()):
            if isinstance(module, DoRANLinear):
                _set_submodule(merged, name, module.to_linear())
        for module in merged.modules():
            if "doran_generators" in module._modules:
                del module._modules["doran_generators"]
        merged.__dict__.pop("doran_spec", None)
    if _is_backbone(model):
        model.model = merged
        model._fingerprint = None
        return model
    return merged


def trainable_parameter_report(model: nn.Module) -> dict[str, Any]:
    """Trainable and total parameter counts, their ratio and the adapted module names."""
    trainable = total = 0
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return {
        "kind": adapter_kind(model),
        "trainable": int(trainable),
        "total": int(total),
        "fraction": trainable / total if total else 0.0,
        "adapted_modules": adapted_module_names(model),
    }


def _output_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "last_hidden_state", None) is not None:
        return output.last_hidden_state
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"cannot take a tensor from a model output of type {type(output).__name__}")


def _run(model: nn.Module, sample_input: torch.Tensor) -> torch.Tensor:
    hf = _hf_model(model)
    was_training = hf.training
    hf.eval()
    try:
        with torch.no_grad():
            device = next(hf.parameters()).device
            return _output_tensor(hf(pixel_values=sample_input.to(device))).float().cpu()
    finally:
        hf.train(was_training)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max().item())


def _adapter_spec(model: nn.Module) -> tuple[set[str], list[int]]:
    """Targets and blocks the adapters were configured with (peft config or ``doran_spec``)."""
    inner = _hf_model_or_peft(model)
    if _is_peft_model(inner):
        config = next(iter(inner.peft_config.values()))
        targets = config.target_modules
        targets = {targets} if isinstance(targets, str) else set(targets or ())
        blocks = config.layers_to_transform
        blocks = [blocks] if isinstance(blocks, int) else list(blocks if blocks is not None else range(num_blocks(inner)))
        return targets, blocks
    spec = getattr(_hf_model(model), "doran_spec", None)
    if spec is None:
        raise ValueError("the model carries no adapters - apply_lora/apply_dora/apply_doran first")
    return set(spec["targets"]), list(spec["blocks"])


def verify_peft(
    base_model: nn.Module,
    adapted_model: nn.Module,
    sample_input: torch.Tensor,
    expected_modules: Sequence[str] | None = None,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Figures for the gate-4 criterion "PEFT applied correctly".

    ``base_model`` is an unadapted copy of the source (same weights), ``adapted_model`` the
    adapted one; outputs are the last hidden states on ``sample_input`` in eval mode. Reported:
    which modules carry adapters against the expected ones (the configured targets x blocks,
    looked up in ``base_model``, unless ``expected_modules`` is given), ``init_max_abs_diff`` (adapted
    vs base: 0 up to rounding right after applying the adapters; later it measures how far
    training moved the output), ``disabled_max_abs_diff`` (adapters off vs base: the frozen
    weights are untouched), ``merged_max_abs_diff`` (a merged copy vs the unmerged model),
    trainable counts, and trainable parameters that are not adapter parameters. ``passed`` holds
    when modules match, all three differences are <= ``atol`` and nothing else trains.
    """
    adapted_names = adapted_module_names(adapted_model)
    if expected_modules is None:
        expected = expected_adapter_modules(base_model, *_adapter_spec(adapted_model))
    else:
        expected = sorted(expected_modules)
    base_out = _run(base_model, sample_input)
    adapted_out = _run(adapted_model, sample_input)
    with adapters_disabled(adapted_model):
        disabled_out = _run(adapted_model, sample_input)
    merged = merge_adapters(copy.deepcopy(adapted_model))
    merged_out = _run(merged, sample_input)
    report = trainable_parameter_report(adapted_model)
    other_trainable = sorted(
        name for name, p in _hf_model(adapted_model).named_parameters()
        if p.requires_grad and not _is_adapter_parameter(name)
    )
    figures = {
        "kind": report["kind"],
        "expected_modules": list(expected),
        "adapted_modules": adapted_names,
        "missing_modules": sorted(set(expected) - set(adapted_names)),
        "unexpected_modules": sorted(set(adapted_names) - set(expected)),
        "init_max_abs_diff": _max_abs(adapted_out, base_out),
        "disabled_max_abs_diff": _max_abs(disabled_out, base_out),
        "merged_max_abs_diff": _max_abs(merged_out, adapted_out),
        "trainable": report["trainable"],
        "total": report["total"],
        "trainable_fraction": report["fraction"],
        "non_adapter_trainable": other_trainable,
        "atol": float(atol),
    }
    figures["modules_as_expected"] = not figures["missing_modules"] and not figures["unexpected_modules"] and bool(adapted_names)
    figures["passed"] = bool(
        figures["modules_as_expected"]
        and figures["init_max_abs_diff"] <= atol
        and figures["disabled_max_abs_diff"] <= atol
        and figures["merged_max_abs_diff"] <= atol
        and not other_trainable
    )
    return figures
