"""Repeated n-gram share of answers, by hand."""

import torch

from rlhf.algorithms.repetition import repeated_ngram_share


def test_repeated_ngram_share_by_hand():
    tokens = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2],    # answer: 1 2 3 1 2 3, then 2 padding
                           [5, 5, 5, 5, 5, 5, 5, 5],    # 5 x 8
                           [1, 2, 3, 4, 5, 6, 7, 8],    # answer 1 2: shorter than a 3-gram
                           [4, 9, 4, 9, 7, 7, 7, 7]])   # answer 4 9 4 9 7
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8, [1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]).float()
    # 3-grams: 123 231 312 123 -> 1 of 4 repeats (the padding's 3-grams do not count);
    # 555 x 6 -> 5 of 6; none -> 0; 494 949 497 -> 0 of 3.
    expected = torch.tensor([1 / 4, 5 / 6, 0.0, 0.0])
    torch.testing.assert_close(repeated_ngram_share(tokens, mask, 3), expected)
    # 2-grams of the last answer: 49 94 49 97 -> 1 of 4.
    assert repeated_ngram_share(tokens, mask, 2)[3].item() == 0.25
    # Row order and the batch's other rows change nothing (each answer on its own).
    torch.testing.assert_close(repeated_ngram_share(tokens.flip(0), mask.flip(0), 3), expected.flip(0))
