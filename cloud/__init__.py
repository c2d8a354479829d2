"""IoT platform cloud side: bridge, alarms, writer, web, demo. See docs/architecture.md."""

__version__ = "0.1.0"
