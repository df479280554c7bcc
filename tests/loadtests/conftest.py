from tests.server.conftest import server  # noqa: F401  (a real `ponder serve` on the default model)
