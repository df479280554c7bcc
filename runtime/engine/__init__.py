"""The serving engine: validation, the engine core (scheduler, executor, sampler), its process and client, and
the output processor; docs/architecture.md walks one token through it."""
