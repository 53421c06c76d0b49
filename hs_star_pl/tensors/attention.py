"""Which attention kernel a Hugging Face model runs (``attn_implementation``), checked early.

The policy (``model.attn_implementation``) and the HF PRMs (``prm.init_args.attn_implementation``)
pass the name to transformers, which checks it only while it builds the model: after a 7B
checkpoint has been read, and with a message that does not say which YAML key set it. Here the
name is checked when the config is parsed, against the implementations transformers ships and
the packages they need on this machine.

Covered: the built-in names. Not covered: kernels fetched from the Hugging Face hub (this
package never downloads).
"""

from __future__ import annotations

#: name -> what it needs beyond torch ("" for nothing)
ATTN_IMPLEMENTATIONS: dict[str, str] = {
    "eager": "",
    "sdpa": "",
    "flash_attention_2": "the flash-attn package and a CUDA GPU",
    "flash_attention_3": "the flash-attn 3 package and a Hopper GPU",
    "flex_attention": "a torch with flex attention",
}


def _available(value: str) -> bool:
    """transformers' own check that ``value`` can run on this machine."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available, is_torch_flex_attn_available

    checks = {
        "flash_attention_2": is_flash_attn_2_available,
        "flash_attention_3": is_flash_attn_3_available,
        "flex_attention": is_torch_flex_attn_available,
    }
    return value not in checks or checks[value]()


def check_attn_implementation(value: str | None, key: str) -> str | None:
    """``value`` when transformers can run it here; ``None`` keeps transformers' default (sdpa).

    Args:
        value: the configured name.
        key: the YAML key it came from, for the message.

    Raises:
        ValueError: an unknown name (the message lists the valid ones) or one whose package or
            hardware is missing.
    """
    if value is None:
        return None
    if value not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"{key} must be one of {list(ATTN_IMPLEMENTATIONS)} (or unset), got {value!r}")
    if not _available(value):
        raise ValueError(f"{key}={value!r} needs {ATTN_IMPLEMENTATIONS[value]}, which this machine lacks")
    return value
