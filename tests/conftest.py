"""Shared fixtures live in their own modules, one per real dependency (Redis, vLLM engines)."""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.fixtures_redis", "tests.fixtures_engine", "tests.fixtures_eagle3"]
