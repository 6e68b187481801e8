"""tcompile.passes — installed as `tcompile.passes` through setuptools' package-dir mapping."""
if __name__ != "tcompile.passes":
    raise ImportError(
        "'passes' is part of tcompile and must be imported as 'tcompile.passes', not as a top-level package."
    )

from tcompile.passes import kv_eviction, prompt_pruning, token_merging, token_pruning  # noqa: E402,F401  (register the passes)
from tcompile.passes import sparse_attention  # noqa: E402,F401  (MInference sparse prefill)
from tcompile.passes import speculative  # noqa: E402,F401  (speculative decoding)
from tcompile.registry import available  # noqa: E402,F401  (tcompile.passes.available())
