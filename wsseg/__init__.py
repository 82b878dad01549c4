"""wsseg: turn image-level labels into pixel masks and a deployable segmenter."""

__version__ = "0.1.0"

from wsseg.errors import ConfigError, DataError, WeightsUnavailableError, WssegError  # noqa: E402

__all__ = ["__version__", "ConfigError", "DataError", "WeightsUnavailableError", "WssegError"]
