"""The one exception the exporter raises for bad input; the CLI prints it as a single line."""


class ExportError(Exception):
    """A problem with the user's input or environment, not a bug: shown as one line, exit 2."""
