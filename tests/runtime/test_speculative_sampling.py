"""Speculative sampling is lossless: the tokens a speculative step emits follow the target's
distribution (chi-square over ≥ 20k samples, p > 0.01); LANTERN is lossy only when asked."""
from __future__ import annotations

import pytest
import torch

from tcompile.models.lm import tiny_llama
from tcompile.passes.speculative import SpeculativeOptions
from tcompile.registry import PassSpec
from tcompile.runtime import capture_lm
from tcompile.runtime.acceptance import accept_sample, relaxed_mass
from tcompile.runtime.drafters import DraftTree
from tcompile.runtime.lm_optimize import runtime_for

SAMPLES = 20_480
ROWS = 4096
TEMPERATURE = 0.5


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor, samples: int) -> float:
    """p-value of Pearson's chi-square test of ``counts`` against ``probs`` (bins expecting < 5
    merged into one), from the chi-square survival function Q(df/2, x/2)."""
    expected = probs.double() * samples
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def exact_marginals(model: torch.nn.Module, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's exact distributions of the 2nd and 3rd new tokens (temperature-warped)."""
    def dist(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (model(ids).logits[:, -1].double() / TEMPERATURE).softmax(-1)
    v = model.config.vocab_size
    p1 = dist(prompt[None])[0]
    one = torch.cat([prompt.expand(v, -1), torch.arange(v)[:, None]], dim=1)
    p2 = dist(one)                                                     # [x1, x2]
    two = torch.cat([one.repeat_interleave(v, 0), torch.arange(v).repeat(v)[:, None]], dim=1)
    p3 = dist(two).reshape(v, v, v)                                    # [x1, x2, x3]
    m2 = (p1[:, None] * p2).sum(0)
    m3 = (p1[:, None, None] * p2[:, :, None] * p3).sum((0, 1))
    return m2, m3


@pytest.fixture(scope="module")
def target():
    model = tiny_llama()
    return model, capture_lm(model, verify=True)


PROMPT = torch.randperm(128, generator=torch.Generator().manual_seed(2))[:48]   # distinct tokens: a lookup hit
                                                                              # for any first token among them


@pytest.fixture(scope="module")
def marginals(target):
    return exact_marginals(target[0], PROMPT)


@pytest.mark.parametrize("drafter", ["draft_model", "prompt_lookup", "token_recycling"])
def test_speculative_sampling_matches_the_target_distribution(target, marginals, drafter):
    """20k rows, one prompt, 4 new tokens: the 2nd and 3rd tokens come from the first speculative
    step (accepted drafts, residual draws, bonus tokens) and must follow the target's marginals."""
    model, program = target
    extra = {"draft": tiny_llama(seed=1), "fallback": 0.0} if drafter == "draft_model" else {}
    opts = SpeculativeOptions(drafter=drafter, k=3, **extra)
    runtime, _ = runtime_for(program, [PassSpec("speculative", opts)], model)
    prompt = PROMPT
    if drafter == "token_recycling":   # warm the adjacency matrix (every token as a root) so each step drafts a tree
        runtime.generate(torch.arange(128)[:, None], max_new_tokens=16)
    generator, outs, drafted, accepted = torch.Generator().manual_seed(0), [], 0, 0
    for _ in range(SAMPLES // ROWS):        # the captured graphs serve batches of up to 4096 rows
        outs.append(runtime.generate(prompt.expand(ROWS, -1).contiguous(), max_new_tokens=4, do_sample=True,
                                     temperature=TEMPERATURE, generator=generator))
        drafted, accepted = drafted + runtime.last_stats.drafted, accepted + runtime.last_stats.accepted
    out = torch.cat(outs)
    assert out.shape[0] >= SAMPLES and drafted > SAMPLES // 4 and 0 < accepted < drafted    # both rules fired
    m2, m3 = marginals
    v = model.config.vocab_size
    for column, probs in ((prompt.numel() + 1, m2), (prompt.numel() + 2, m3)):
        counts = torch.bincount(out[:, column], minlength=v)
        assert chi_square_p(counts, probs, out.shape[0]) > 0.01


def test_rejection_rule_with_a_fixed_p_and_q():
    """E1's unit test: fixed p and q over 4 tokens; the first emitted token follows p."""
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.7, 0.1, 0.1, 0.1]])
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(4, dtype=torch.long)
    for _ in range(SAMPLES):
        x = int(torch.multinomial(q[0], 1, generator=gen))
        path, bonus = accept_sample(DraftTree.chain([x], q), p, gen)
        counts[x if len(path) == 2 else bonus] += 1
    assert chi_square_p(counts, p[0], SAMPLES) > 0.01


def test_lantern_relaxation():
    p = torch.tensor([0.30, 0.05, 0.04, 0.50, 0.11])
    neighbours = torch.tensor([[1, 2, 4, 3]] + [[0, 1, 2, 3]] * 4)   # token 0's nearest: 1, 2, 4, 3
    assert relaxed_mass(p, 0, neighbours, 0.0) == pytest.approx(0.30)
    assert relaxed_mass(p, 0, neighbours, 0.1) == pytest.approx(0.30 + 0.09)      # 0.05 + 0.04 ≤ 0.1 < +0.11
    assert relaxed_mass(p, 0, neighbours, 0.2) == pytest.approx(0.30 + 0.20)


def test_lantern_is_reported_lossy_and_delta_0_is_exact(target):
    model, program = target
    prompt = torch.tensor([[5, 9, 17, 33, 5, 9, 17, 33, 5, 9]])
    runs = {}
    for delta in (0.0, 0.3):
        opts = SpeculativeOptions(drafter="prompt_lookup", k=4, acceptance="lantern", delta=delta)
        runtime, _ = runtime_for(program, [PassSpec("speculative", opts)], model)
        runs[delta] = runtime.generate(prompt, max_new_tokens=24, do_sample=True, temperature=TEMPERATURE,
                                       generator=torch.Generator().manual_seed(3))
        assert runtime.last_stats.lossy is (delta > 0)
    exact, _ = runtime_for(program, [PassSpec("speculative", SpeculativeOptions(drafter="prompt_lookup", k=4))], model)
    same = exact.generate(prompt, max_new_tokens=24, do_sample=True, temperature=TEMPERATURE,
                          generator=torch.Generator().manual_seed(3))
    assert exact.last_stats.lossy is False
    assert torch.equal(runs[0.0], same)      # delta = 0: the exact rule, draw for draw


def test_sampling_options_out_of_range_are_clear_errors(target):
    model, program = target
    runtime, _ = runtime_for(program, [PassSpec("speculative", SpeculativeOptions())], model)
    prompt = torch.tensor([[1, 2, 3]])
    for kwargs, match in [({"temperature": 0.0}, "temperature"), ({"top_p": 1.5}, "top_p"), ({"top_k": 0}, "top_k")]:
        with pytest.raises(ValueError, match=match):
            runtime.generate(prompt, max_new_tokens=4, do_sample=True, **kwargs)
    greedy_only, _ = runtime_for(program, [PassSpec("speculative", SpeculativeOptions(acceptance="greedy"))], model)
    with pytest.raises(ValueError, match="acceptance='greedy'"):
        greedy_only.generate(prompt, max_new_tokens=4, do_sample=True)
