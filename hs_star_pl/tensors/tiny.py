"""Tokenizers and causal LMs built locally from a config: no hub, no downloads.

What the tests, the embedded demo and the benchmarks run on. Both save and load with
``save_pretrained``/``from_pretrained`` exactly like a real checkpoint, so every path that
serves a 7B model (HF engine, vLLM engine, PRMs, export) is exercised on them.

The tokenizer is Qwen2's own format (byte-level BPE) with the 256 byte symbols and *no
merges*, i.e. one token per UTF-8 byte. Being a genuine ``Qwen2Tokenizer`` matters: with
transformers 5.x, ``AutoTokenizer`` (and so vLLM) on a folder whose ``config.json`` says Qwen2
rebuilds Qwen's tokenizer pipeline whatever ``tokenizer_config.json`` names, and a
character-level tokenizer of another shape then loses spaces and newlines
(docs/findings.md). Like Qwen2.5 base models, pad and EOS are the same token
(``<|endoftext|>``), so code must mask by lengths, never by comparing with the pad id.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

EOS = "<|endoftext|>"

#: Qwen's ChatML markup, so ``data.template: chat`` runs on the tiny models. The markers are
#: not special tokens here: the byte-level tokenizer spells them out byte by byte.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_byte_tokenizer(extra_special_tokens: Sequence[str] = ()) -> Qwen2Tokenizer:
    """A Qwen2-format tokenizer with one token per byte (ids 0..255), then specials.

    Args:
        extra_special_tokens: atomic tokens added after ``<|endoftext|>`` (id 256), e.g.
            ``"<extra_0>"`` for the Qwen2.5-Math-PRM format.

    ``decode(encode(text)) == text`` for any text, through every loader. Its chat template
    is ``CHAT_TEMPLATE``.
    """
    byte_to_symbol = bytes_to_unicode()
    vocab = {byte_to_symbol[b]: b for b in range(256)}
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        eos_token=EOS,
        pad_token=EOS,
        extra_special_tokens=list(extra_special_tokens),
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_qwen2_config(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    eos_token_id: int = 256,
    attn_implementation: str | None = None,
) -> Qwen2Config:
    """A Qwen2 architecture config small enough for CPU tests (defaults: ~0.1M params).

    ``attn_implementation`` ``None`` keeps transformers' default (``sdpa``).
    """
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads or num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=eos_token_id,
        tie_word_embeddings=True,
        attn_implementation=attn_implementation,
    )


def build_tiny_causal_lm(
    tokenizer: PreTrainedTokenizerBase, *, seed: int = 0, **config_kwargs: int | str | None
) -> Qwen2ForCausalLM:
    """A randomly initialised ``Qwen2ForCausalLM`` whose vocabulary matches ``tokenizer``."""
    import torch

    config = tiny_qwen2_config(len(tokenizer), eos_token_id=tokenizer.eos_token_id, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_checkpoint_dir(directory: str | Path, model, tokenizer: PreTrainedTokenizerBase) -> Path:
    """Save model and tokenizer side by side: loadable by ``AutoModelForCausalLM`` and vLLM."""
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    """Load a checkpoint folder's tokenizer the way vLLM does (``AutoTokenizer``)."""
    return AutoTokenizer.from_pretrained(str(directory))
