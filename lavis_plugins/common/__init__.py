"""Shared pieces. Light on purpose (the CLI's --help imports ``common.errors``): the lr schedulers
of ``common.optim`` are registered by ``lavis_plugins.register()``, which imports it."""
