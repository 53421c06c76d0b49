"""How a preference pair becomes the token sequences training and the reference pass see."""

from __future__ import annotations

import dataclasses

from hs_star_pl.tensors.collate import encode_example, encode_pair
from hs_star_pl.core.records import PreferencePair
from hs_star_pl.tensors.tiny import build_byte_tokenizer


def test_a_cut_rejected_is_encoded_without_eos():
    pair = PreferencePair("p", "Q", "A\n\nB", "A\n\nB'", "p#0", "p#1", 1.0, 0.0, rejected_cut=True)
    tok = build_byte_tokenizer()
    full = encode_example(tok, "Q", pair.rejected, 64)
    cut = encode_example(tok, "Q", pair.rejected, 64, eos=False)
    assert full.ids[-1] == tok.eos_token_id and cut.ids == full.ids[:-1]
    # what training and the reference pass encode: the chosen ends with EOS, the cut rejected not
    chosen, rejected = encode_pair(tok, pair, 64)
    assert chosen.ids[-1] == tok.eos_token_id and rejected == cut
    uncut_chosen, uncut = encode_pair(tok, dataclasses.replace(pair, rejected_cut=False), 64)
    assert uncut_chosen == chosen and uncut == full
