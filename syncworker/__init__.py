"""syncworker: keeps service-discovery data in sync between registries and into gateways."""

__version__ = "0.1.0"
