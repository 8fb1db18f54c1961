"""Draft versions: which exist, which serves, which served before (Redis), and the announcement that tells every
engine to swap. Written by the worker and by the gateway's admin API, read by every gateway and by the worker's
gate; a leaf below trainer and gateway."""

from lkserve.drafts.keys import Announcement, DraftKeys
from lkserve.drafts.registry import AnnounceError, AsyncDraftRegistry, DraftRegistry

__all__ = ["AnnounceError", "Announcement", "AsyncDraftRegistry", "DraftKeys", "DraftRegistry"]
