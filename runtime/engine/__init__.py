"""The serving engine: request scheduling, paged KV block accounting and (later) the batched executor."""
