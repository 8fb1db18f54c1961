"""Model builders: tiny test models, SmolLM2 and the drafts derived from it."""
