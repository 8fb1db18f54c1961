"""The OpenAI-compatible HTTP gateway (`lkserve serve`): FastAPI app around the engine. See docs/gateway.md."""

from lkserve.gateway.app import create_app

__all__ = ["create_app"]
