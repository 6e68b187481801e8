"""Speculative decoding with model drafters on the real SmolLM2-135M-Instruct: greedy output
equals plain greedy, token for token, 128 new tokens, batch 1 and batch 2 (issue 4, acceptance 1;
the model-free drafters are checked in test_smollm2.py, on the other xdist worker)."""
from __future__ import annotations

import pytest

from smollm2_helpers import check_speculative_equals_plain

pytestmark = pytest.mark.slow


def _options(drafter, model):
    from tcompile.passes.speculative import SpeculativeOptions
    from tcompile.runtime.model_drafters import skip_layers
    # Exactness does not depend on how good the draft is; small drafts keep this test's drafting
    # cheap (CI time): no smaller SmolLM2 ships offline, so a 4-layer copy stands in, and
    # layer_skip drafts with the same 4 layers (26 of 30 skipped).
    if drafter == "draft_model":
        return SpeculativeOptions(drafter="draft_model", k=4, fallback=0.3, draft=skip_layers(model, tuple(range(2, 28))))
    return SpeculativeOptions(drafter="layer_skip", k=4, skip=tuple(range(2, 28)), fallback=0.3)


@pytest.mark.parametrize("drafter", ["draft_model", "layer_skip"])
def test_smollm2_model_drafters_equal_plain_greedy(smollm2, smollm2_plain, drafter):
    check_speculative_equals_plain(smollm2, smollm2_plain, _options(drafter, smollm2[0]))
