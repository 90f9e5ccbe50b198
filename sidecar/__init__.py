"""budget-sidecar: atomic spend and rate limits for AI agents, next to each agent, over Redis."""

__version__ = "0.1.0"
