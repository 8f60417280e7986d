"""Frozen DINOv3 backbone: local Hugging Face checkpoints only, CLS features, content fingerprint.

``model_path`` is either a directory in Hugging Face format (``config.json`` + weights) or
``builtin:tiny-dinov3``, a small randomly initialised DINOv3 (fixed seed) that is written once
under ``<artifacts_root>/backbones/tiny-dinov3/`` and then loaded through exactly the same
``AutoModel.from_pretrained(dir, local_files_only=True)`` call a real checkpoint goes through.
Nothing here touches the network: a hub id or a missing directory fails at once and says how
to fetch the weights on a networked machine.

Features are the CLS token ``last_hidden_state[:, 0]``, computed in ``eval()`` mode (in train
mode DINOv3 randomly rescales its RoPE coordinates, so features would not be reproducible) and
under ``torch.inference_mode()``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stage1_core.dirswap import publish_directory

BUILTIN_PREFIX = "builtin:"
TINY_DINOV3 = "tiny-dinov3"
BUILTIN_SEED = 0
#: ``DINOv3ViTConfig`` arguments of the builtin backbone (hidden 192, 4 layers, 4 registers).
TINY_DINOV3_CONFIG: dict[str, Any] = {
    "hidden_size": 192,
    "num_hidden_layers": 4,
    "num_attention_heads": 3,
    "intermediate_size": 768,
    "patch_size": 16,
    "num_register_tokens": 4,
    "image_size": 224,
}
BUILTIN_BACKBONES: dict[str, dict[str, Any]] = {TINY_DINOV3: TINY_DINOV3_CONFIG}
#: Config keys that record provenance rather than the network, left out of the fingerprint.
_PROVENANCE_KEYS = ("transformers_version", "architectures", "dtype", "torch_dtype")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class BackboneError(ValueError):
    """The backbone cannot be resolved or loaded; the message says what to do."""


def fetch_instructions(model_path: str) -> str:
    """How to obtain a checkpoint directory for ``model_path`` on a networked machine."""
    repo = model_path.strip().rstrip("/")
    local = f"models/{repo.split('/')[-1] or 'dinov3'}"
    return (
        f"model_path={model_path!r} is not a local model directory. Stage-1 Pro never downloads "
        f"weights. On a machine with network access run\n"
        f"    huggingface-cli download {repo} --local-dir {local}\n"
        f"(or `hf download {repo} --local-dir {local}`; DINOv3 repositories are gated: accept the "
        f"licence on the Hub and run `huggingface-cli login` first), copy {local}/ to this machine "
        f"and set model_path to that directory (it must contain config.json and the weights). "
        f"Without weights, model_path='{BUILTIN_PREFIX}{TINY_DINOV3}' uses the embedded tiny backbone."
    )


def builtin_backbone_dir(name: str, artifacts_root: str | Path) -> Path:
    """Where the builtin backbone ``name`` lives under ``artifacts_root``."""
    return Path(artifacts_root) / "backbones" / name


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / f).is_file() for f in WEIGHT_FILES)


def ensure_builtin_backbone(name: str, artifacts_root: str | Path) -> Path:
    """Write the builtin backbone ``name`` once (atomically) and return its directory.

    The model is built on CPU under ``torch.manual_seed(BUILTIN_SEED)`` inside a forked RNG
    scope (the caller's random state is left alone), saved to a temporary sibling directory and
    renamed into place, so a concurrent or interrupted writer never leaves a partial directory.
    """
    if name not in BUILTIN_BACKBONES:
        raise BackboneError(
            f"unknown builtin backbone {BUILTIN_PREFIX}{name!r}: available "
            f"{[BUILTIN_PREFIX + n for n in BUILTIN_BACKBONES]}"
        )
    target = builtin_backbone_dir(name, artifacts_root)
    if _is_model_dir(target):
        return target
    if target.exists():
        raise BackboneError(
            f"{target} exists but is not a complete model directory (config.json and weights); "
            f"delete it and run again to rebuild the builtin backbone"
        )
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(BUILTIN_SEED)
            model = DINOv3ViTModel(DINOv3ViTConfig(**BUILTIN_BACKBONES[name]))
        model.save_pretrained(tmp)
        tmp.chmod(0o755)
        try:
            publish_directory(tmp, target, replace=False)
        except OSError:  # FileExistsError included: another process built it first
            if not _is_model_dir(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_backbone(model_path: str, artifacts_root: str | Path) -> Path:
    """The local directory for ``model_path`` (building the builtin backbone when asked for it).

    Raises :class:`BackboneError` for a hub id, a missing directory or a directory that is not a
    Hugging Face model (no ``config.json`` or no weights); the message says how to fix it.
    """
    if model_path.startswith(BUILTIN_PREFIX):
        return ensure_builtin_backbone(model_path[len(BUILTIN_PREFIX):], artifacts_root)
    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise BackboneError(fetch_instructions(model_path))
    if not (path / "config.json").is_file():
        raise BackboneError(
            f"{path} has no config.json, so it is not a Hugging Face model directory. "
            + fetch_instructions(model_path)
        )
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise BackboneError(
            f"{path} has config.json but no weights (expected one of {', '.join(WEIGHT_FILES)}). "
            + fetch_instructions(model_path)
        )
    return path


def _canonical_config(config: Any) -> str:
    data = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in _PROVENANCE_KEYS}
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint_model(model: nn.Module, config: Any) -> str:
    """sha256 over the canonical config JSON and every state_dict tensor (sorted by key).

    Each tensor contributes its name, dtype, shape and raw bytes, so any change of weights,
    precision or architecture changes the fingerprint; provenance fields of the config
    (transformers version, dtype label) do not.
    """
    digest = hashlib.sha256()
    digest.update(_canonical_config(config).encode("utf-8"))
    state = model.state_dict()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"\x00{key}\x00{tensor.dtype}\x00{tuple(tensor.shape)}\x00".encode("utf-8"))
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a :class:`DINOv3Backbone` and/or a peft ``PeftModel``."""
    model = model.model if isinstance(model, DINOv3Backbone) else model
    get_base = getattr(model, "get_base_model", None)  # peft.PeftModel
    return get_base() if callable(get_base) else model


def checkpointed_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model`` whose activations are recomputed in backward."""
    hf = _hf_model(model)
    return [m for m in hf.modules() if m is not hf and getattr(m, "gradient_checkpointing", False) is True]


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Turn on Hugging Face activation checkpointing of every transformer block; return how many.

    Each block keeps only its input during the forward pass and recomputes its activations in
    backward (non-reentrant ``torch.utils.checkpoint``, which works with frozen base weights and
    adapters), trading about one extra forward pass for activation memory that no longer grows
    with depth. The results are unchanged.
    """
    hf = _hf_model(model)
    if not getattr(hf, "supports_gradient_checkpointing", False):
        raise BackboneError(
            f"{type(hf).__name__} does not support gradient checkpointing: set gradient_checkpointing: false")
    kwargs = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5 name
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    blocks = checkpointed_blocks(hf)
    if not blocks:
        raise BackboneError(f"{type(hf).__name__}: gradient checkpointing enabled no block")
    return len(blocks)


def eval_keeping_checkpointing(model: nn.Module) -> None:
    """``model.eval()`` (no RoPE jitter, no dropout), but checkpointed blocks still recompute.

    Hugging Face checkpoints a block only while its ``training`` flag is set, and the trainer
    runs adapted backbones in eval mode for deterministic features. Only the blocks' own flag is
    set back (their children - attention, dropout, drop path - stay in eval mode, and the block's
    forward itself does not read the flag), so the features are those of eval mode.
    """
    model.eval()
    for block in checkpointed_blocks(model):
        block.training = True


class DINOv3Backbone(nn.Module):
    """A Hugging Face vision transformer used as a frozen CLS feature extractor.

    ``forward(pixel_values)`` returns CLS features under the current grad mode and module mode
    (what a later phase with trainable adapters needs); :meth:`extract` is the deterministic
    path (``eval()`` + ``inference_mode()``) that feature caches and frozen training use.
    ``forward_passes`` counts batches run through the transformer by this object.
    """

    def __init__(self, model: nn.Module, source: str | Path | None = None) -> None:
        super().__init__()
        self.model = model
        self.source = str(source) if source is not None else None
        self.forward_passes = 0
        self.frozen_parameters = 0
        self._fingerprint: str | None = None

    @classmethod
    def load(
        cls,
        model_path_or_dir: str | Path,
        *,
        artifacts_root: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        freeze: bool = True,
    ) -> "DINOv3Backbone":
        """Load from a Hugging Face directory (or ``builtin:<name>`` with ``artifacts_root``).

        Weights are cast to ``dtype`` (float32 by default: CPU inference in half precision is
        slow and the fingerprint then does not depend on how the checkpoint was stored).
        """
        text = str(model_path_or_dir)
        if text.startswith(BUILTIN_PREFIX):
            if artifacts_root is None:
                raise BackboneError(
                    f"{text!r} needs artifacts_root (where the builtin backbone is written); "
                    f"pass artifacts_root=... or a directory returned by resolve_backbone()"
                )
            directory = resolve_backbone(text, artifacts_root)
        else:
            directory = resolve_backbone(text, artifacts_root or ".")
        from transformers import AutoModel

        try:
            model = AutoModel.from_pretrained(directory, local_files_only=True, dtype=dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise BackboneError(f"{directory}: cannot load the model with transformers ({exc})") from exc
        backbone = cls(model, source=directory)
        backbone.to(device)
        backbone.model.eval()
        if freeze:
            backbone.freeze()
        return backbone

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def freeze(self) -> int:
        """Set ``requires_grad=False`` on every parameter; return how many values were frozen."""
        count = 0
        for param in self.model.parameters():
            param.requires_grad_(False)
            count += param.numel()
        self.frozen_parameters = count
        return count

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that still require gradients (none after :meth:`freeze`)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLS features ``[B, hidden]`` under the caller's grad and train/eval mode."""
        outputs = self.model(pixel_values=pixel_values.to(self.device, self.dtype))
        self.forward_passes += 1
        return outputs.last_hidden_state[:, 0]

    def extract(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLS features ``[B, hidden]`` in ``eval()`` mode under ``inference_mode()``."""
        self.model.eval()
        with torch.inference_mode():
            return self.forward(pixel_values)

    def fingerprint(self, refresh: bool = False) -> str:
        """Content hash of config + weights (see :func:`fingerprint_model`), cached after the first call."""
        if self._fingerprint is None or refresh:
            self._fingerprint = fingerprint_model(self.model, self.model.config)
        return self._fingerprint
