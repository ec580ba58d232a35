"""A handler that keeps the tool's log lines for a test to read."""
import logging


class CapturedLog(logging.Handler):
    """Records of the "gsparsity" logger (which does not propagate to pytest's caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
