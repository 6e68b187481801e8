import pytest
import torch

from tcompile.models.lm import tiny_gpt2, tiny_llama
from tcompile.runtime import capture_lm


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def llama_program(llama):
    return capture_lm(llama)


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


@pytest.fixture(scope="module")
def gpt2_program(gpt2):
    return capture_lm(gpt2)


@pytest.fixture
def prompts():
    """Three prompts of 16, 13 and 10 tokens, left padded to 16."""
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids, mask


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct, its tokenizer and its program (with the verify step),
    captured once per test process for every SmolLM2 test module (a capture takes about a minute)."""
    from tcompile.models.lm import load_smollm2, load_smollm2_tokenizer
    model = load_smollm2()
    return model, load_smollm2_tokenizer(), capture_lm(model, "SmolLM2-135M-Instruct", verify=True)


@pytest.fixture(scope="session")
def smollm2_plain(smollm2):
    """Two chat prompts and plain greedy's 128 new tokens after them, for the speculative checks."""
    from smollm2_helpers import plain_greedy
    return plain_greedy(smollm2)
