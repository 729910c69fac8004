"""Evaluation prompts of ``sglang_dsv4/train/data.py``."""

from tokenizers import Tokenizer

from sglang_dsv4.embedded import embedded_checkpoint
from sglang_dsv4.train.data import TEST_PLAYS, held_out_crops, load_plays


def test_held_out_crops_come_from_the_test_plays():
    tok = Tokenizer.from_file(str(embedded_checkpoint() / "tokenizer.json"))
    crops = held_out_crops(tok, 5, 64)
    assert [len(c) for c in crops] == [64] * 5
    assert len({tuple(c) for c in crops}) == 5  # distinct positions
    plays = load_plays()
    for i, crop in enumerate(crops):
        # a crop decodes to text of its play (the first and last token may be cut mid-word)
        inner = tok.decode(crop[2:-2])
        assert inner in plays[TEST_PLAYS[i % len(TEST_PLAYS)]], (i, inner[:80])
    assert held_out_crops(tok, 5, 64) == crops  # fixed, not random
