"""The ``local`` sandbox backend: bubblewrap jails and an Xvfb desktop."""

from sandboxes.local.config import LocalConfig
from sandboxes.local.factory import local_factory
from sandboxes.local.sandbox import LocalSandbox

__all__ = ["LocalConfig", "LocalSandbox", "local_factory"]
