"""The ``local`` sandbox backend: bubblewrap jails and an Xvfb desktop."""

from sandboxes.local.config import LocalConfig
from sandboxes.local.sandbox import LocalSandbox, local_factory

__all__ = ["LocalConfig", "LocalSandbox", "local_factory"]
