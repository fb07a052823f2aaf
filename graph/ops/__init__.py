"""Op definitions; importing this package registers every op."""
from graph.ops import array, elementwise, linalg, losses, nn  # noqa: F401
