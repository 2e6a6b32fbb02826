"""Hub-related code; `mtpress.hub.server` is the local, file-backed Hub stand-in re-exported here."""

from mtpress.hub.server import Fault, FaultPlan, LocalHub, serve

__all__ = ["Fault", "FaultPlan", "LocalHub", "serve"]
