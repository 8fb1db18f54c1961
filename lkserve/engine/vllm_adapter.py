"""Placeholder until the engine issue: the vLLM plugin entry point must resolve."""


def register_plugin() -> None:
    return None
