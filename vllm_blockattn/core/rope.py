"""RoPE helpers shared by the reference and both serving backends: a key encoded at position p and
rotated by d is the key at p + d exactly (RoPE is relative), which is what lets a block's KV, encoded
from position 0, be placed at any offset. Only rotary types that are a pure rotation of the stored keys
qualify (default, llama3); the others are refused.
"""

from __future__ import annotations

import torch

SUPPORTED_ROPE_TYPES = ("default", "llama3")


def inv_freq_from_config(config, head_dim: int | None = None) -> torch.Tensor:
    """RoPE inverse frequencies ``[head_dim // 2]`` (float32) of a Hugging Face config.

    Refuses rotary types whose keys are not a pure rotation by position (anything but default and
    llama3), and partial rotary embeddings.
    """
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise NotImplementedError(
            f"rope_type {rope_type!r} is not supported by block attention's position re-encoding "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)}): its keys are not a pure rotation by position"
        )
    if getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise NotImplementedError("partial rotary embeddings are not supported by block attention")
    if rope_type == "llama3":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        assert scaling == 1.0
        return inv_freq.float()
    dim = head_dim or getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rope_inv_freq(model) -> torch.Tensor:
    """The rotary inverse frequencies ``[head_dim // 2]`` of an HF model; refuses non-rotation RoPE types."""
    inv_freq_from_config(model.config)  # validates the rope type
    rotary = model.model.rotary_emb
    if getattr(rotary, "attention_scaling", 1.0) != 1.0:
        raise NotImplementedError("RoPE with attention_scaling != 1 cannot be re-encoded by rotation")
    return rotary.inv_freq


def rope_cos_sin(delta: int | torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[..., head_dim]`` (float32) of a RoPE rotation by ``delta`` positions (HF's layout)."""
    delta = torch.as_tensor(delta, dtype=torch.float32, device=inv_freq.device)
    freqs = delta[..., None] * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin``: rotate RoPE'd vectors ``[..., head_dim]`` further."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rotate_keys(keys: torch.Tensor, delta: int | torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate RoPE'd keys ``[..., seq, head_dim]`` by ``delta`` positions (HF's rotate_half layout).

    ``delta`` is a scalar or a ``[seq]`` tensor of per-token shifts. Exact because RoPE rotations
    compose: R(p + d) = R(d) R(p).
    """
    cos, sin = rope_cos_sin(delta, inv_freq.to(keys.device))
    return apply_rotation(keys, cos.to(keys.dtype), sin.to(keys.dtype))
