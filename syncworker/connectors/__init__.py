"""Connectors: one module per external system, all behind `connectors.base.Connector`."""
