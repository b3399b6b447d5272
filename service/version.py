"""The installed version of forcedphot (a leaf module: every layer may import it)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("forcedphot")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
