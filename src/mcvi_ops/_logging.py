"""The package's log output: INFO messages visible in notebooks and terminals, as in scvi-tools.

:func:`setup_logging` (run when the models are first imported) gives the ``"mcvi_ops"`` logger one
handler and the INFO level, and changes nothing else. The handler stays quiet while the root
logger has handlers of its own (``logging.basicConfig``, pytest), which then receive the
messages through propagation, so nothing is printed twice.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator

PACKAGE_LOGGER = "mcvi_ops"

#: the loggers of Lightning's ``rank_zero_info`` messages
_LIGHTNING_INFO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
)
#: Lightning's advertisements of its cloud services, printed by every new Trainer
_ADVERTISEMENT = re.compile(r"litlogger|litmodels|Lightning (Experiments|model registry)", re.I)


class _PackageHandler(logging.StreamHandler):
    """Writes the package's records to stderr unless the root logger handles them already."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        self.stream = sys.stderr  # the current one: notebooks and test runners replace it
        super().emit(record)


def _package_handler(logger: logging.Logger) -> logging.Handler | None:
    return next((h for h in logger.handlers if isinstance(h, _PackageHandler)), None)


def setup_logging(level: int | str | None = None) -> logging.Logger:
    """Give the ``"mcvi_ops"`` logger its handler (once) and a level (INFO unless set already).

    Parameters
    ----------
    level
        Level to set; by default INFO if the logger has none yet.

    Returns
    -------
    The package logger.
    """
    logger = logging.getLogger(PACKAGE_LOGGER)
    if _package_handler(logger) is None:
        handler = _PackageHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    if level is not None:
        logger.setLevel(level)
    elif logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    return logger


class _NoAdvertisements(logging.Filter):
    """Drops third-party advertisements (Lightning's cloud-service tips), keeps everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _ADVERTISEMENT.search(record.getMessage())


@contextlib.contextmanager
def without_advertisements() -> Iterator[None]:
    """Within the block, Lightning's tips for its cloud services are not logged.

    Only while training runs: other messages of Lightning, and its loggers outside the block,
    are left as they are.
    """
    no_ads = _NoAdvertisements()
    loggers = [logging.getLogger(name) for name in _LIGHTNING_INFO_LOGGERS]
    for logger in loggers:
        logger.addFilter(no_ads)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(no_ads)


def interactive_output() -> bool:
    """Whether standard output is a terminal or a notebook, where progress bars redraw in place.

    In a log file (batch jobs, CI) every refresh of a bar is another line, so progress is
    reported a line at a time instead.
    """
    isatty = getattr(sys.stdout, "isatty", None)
    if isatty is not None and isatty():
        return True
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"  # Jupyter, VS Code notebooks


class Settings:
    """Package settings.

    Examples
    --------
    >>> import logging
    >>> from mcvi_ops._logging import settings
    >>> settings.verbosity = "WARNING"  # hide INFO messages
    >>> settings.verbosity == logging.WARNING
    True
    >>> settings.verbosity = "INFO"
    """

    @property
    def verbosity(self) -> int:
        """Level of the messages shown (``logging.INFO`` by default); a name or a number."""
        return logging.getLogger(PACKAGE_LOGGER).getEffectiveLevel()

    @verbosity.setter
    def verbosity(self, level: int | str) -> None:
        if isinstance(level, str):
            level = level.upper()
            if level not in logging.getLevelNamesMapping():
                msg = (
                    f"Unknown verbosity {level!r}; use 'DEBUG', 'INFO', 'WARNING' or 'ERROR' "
                    "(or a `logging` level number)."
                )
                raise ValueError(msg)
        setup_logging(level)


#: the package settings (``mcvi_ops.settings``)
settings = Settings()
