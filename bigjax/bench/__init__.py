"""Benchmarks: a training step of the Big ResNet against its jitted in-memory twin (``step``)."""
