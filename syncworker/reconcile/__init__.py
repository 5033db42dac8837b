"""The reconcile core: desired state, pure planning, delete safety, the engine.

It imports no connector by name and no Celery; it talks to connectors only
through `connectors.base.Connector`.
"""
