from lavis_plugins.common import optim  # noqa: F401  registers the lr schedulers
