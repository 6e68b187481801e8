"""tcompile.models — installed as `tcompile.models` through setuptools' package-dir mapping."""
if __name__ != "tcompile.models":
    raise ImportError(
        "'models' is part of tcompile and must be imported as 'tcompile.models', not as a top-level package."
    )

from tcompile.models.zoo import ZooModel, load, names  # noqa: E402,F401
