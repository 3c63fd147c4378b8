"""The one exception the exporter raises for bad input; the CLI prints it as a single line."""


class ExportError(Exception):
    """A problem with the user's input or environment, not a bug: shown as one line, exit 2."""


def missing_tensors(names: list[str]) -> ExportError:
    """The error for a checkpoint that lacks tensors the model needs: the first named, the rest counted."""
    more = f" nor {len(names) - 1} more the model needs" if len(names) > 1 else ""
    return ExportError(f"the checkpoint has no tensor {names[0]!r}{more} (a file missing or cut short?)")
