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
