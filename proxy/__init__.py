"""The HTTP surface of memlane: an OpenAI-compatible proxy that adds the user's memories."""

from proxy.app import create_app
from proxy.settings import Settings, SettingsError

__all__ = ["Settings", "SettingsError", "create_app"]
