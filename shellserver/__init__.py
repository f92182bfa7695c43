"""shellserver: sandboxed IPython consoles behind a "Launch interactive shell" button."""

__version__ = "0.1.0"
