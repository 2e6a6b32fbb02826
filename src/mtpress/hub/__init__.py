"""Local Hugging Face Hub stand-in: see `mtpress.hub.server`."""

from mtpress.hub.server import Fault, FaultPlan, LocalHub, serve

__all__ = ["Fault", "FaultPlan", "LocalHub", "serve"]
