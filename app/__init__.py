"""The Dash workbench app (`create_app`) and the static HTML report (`write_report`)."""
from .app import create_app  # noqa: F401
from .report import write_report  # noqa: F401
