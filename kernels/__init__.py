"""tcompile.kernels — installed as `tcompile.kernels` through setuptools' package-dir mapping."""
if __name__ != "tcompile.kernels":
    raise ImportError(
        "'kernels' is part of tcompile and must be imported as 'tcompile.kernels', not as a top-level package."
    )
