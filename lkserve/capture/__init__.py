"""Capture stream: verification records from the engine into Redis Streams, and back out for the trainer.

record.py (the contract) -> codec.py (bytes) -> sink.py / writer.py (engine side) -> reader.py (trainer side);
embedded_redis.py starts a private redis-server when no URL is configured. See docs/capture.md.
"""
