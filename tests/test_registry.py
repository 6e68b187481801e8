"""Pass registry and the textual pipeline form."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

import tcompile
from tcompile.errors import PipelineSyntaxError, UnknownPassError
from tcompile.registry import format_pipeline, parse_pipeline, register_pass


def test_round_trip():
    text = "token_merging{r=8,method=pitome},token_pruning{keep=[0.7,0.5],layers=[3,6],fuse=true}"
    specs = parse_pipeline(text)
    assert format_pipeline(specs) == text
    assert parse_pipeline(format_pipeline(specs)) == specs


def test_defaults_print_bare_name():
    assert format_pipeline(parse_pipeline("token_pruning")) == "token_pruning"


def test_unknown_pass_suggests():
    with pytest.raises(UnknownPassError, match="did you mean token_merging"):
        parse_pipeline("token_mergin{r=8}")


@pytest.mark.parametrize("text", ["token_merging{r=8", "token_merging{r}", "token_merging}{"])
def test_syntax_errors(text):
    with pytest.raises(PipelineSyntaxError):
        parse_pipeline(text)


def test_duplicate_registration_raises():
    @dataclass(frozen=True)
    class Opts:
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_pass("token_merging", options=Opts)(lambda gm, ctx: None)


def test_available_lists_options():
    from tcompile.passes import available
    info = available()
    assert info == tcompile.available()
    assert {"token_merging", "token_pruning"} <= set(info)
    assert info["token_merging"]["options"]["method"]["default"] == "tome"
