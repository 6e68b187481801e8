"""tcompile.kernels — installed as `tcompile.kernels` through setuptools' package-dir mapping.

Triton kernels as torch custom ops, each with a PyTorch reference beside it: block_sparse_attention,
vertical_slash (MInference), token_merge (ToMe matching). Import the submodule to register its ops.
"""
if __name__ != "tcompile.kernels":
    raise ImportError(
        "'kernels' is part of tcompile and must be imported as 'tcompile.kernels', not as a top-level package."
    )
