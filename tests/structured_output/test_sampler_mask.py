"""The sampler's grammar mask: the torch unpacking agrees with xgrammar's own kernel; other rows untouched."""

import math

import torch
import xgrammar as xgr

from pagedllm.worker.sampler import GrammarMask, apply_grammar_mask


def test_apply_grammar_mask_matches_xgrammar():
    vocab_size, generator = 100, torch.Generator().manual_seed(0)
    logits = torch.randn(4, vocab_size, generator=generator)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (2, 4), dtype=torch.int32, generator=generator)
    rows = torch.tensor([1, 3])
    ours = apply_grammar_mask(logits.clone(), GrammarMask(rows, bitmask))
    full = torch.full((4, 4), -1, dtype=torch.int32)
    full[rows] = bitmask
    theirs = logits.clone()
    xgr.apply_token_bitmask_inplace(theirs, full, indices=[1, 3])
    assert torch.equal(ours, theirs)
    assert torch.equal(ours[[0, 2]], logits[[0, 2]])
    for index, row in enumerate(rows.tolist()):
        for token in range(vocab_size):
            allowed = (int(bitmask[index, token // 32]) >> (token % 32)) & 1
            assert (ours[row, token] == -math.inf) == (not allowed)
