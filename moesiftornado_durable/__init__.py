"""Durable, disk-spooled Moesif API analytics for Tornado: no event is lost once it has been logged."""

__version__ = "0.1.0"

from .config import Config  # noqa: E402
from .errors import (  # noqa: E402
    AuthError,
    ConfigError,
    DeliveryError,
    MoesifDurableError,
    PermanentError,
    RedirectError,
    RetryableError,
)
from .metrics import HealthHandler, MetricsHandler  # noqa: E402
from .middleware import MoesifMiddleware, SpoolBeforeSendMixin  # noqa: E402

__all__ = [
    "AuthError",
    "Config",
    "ConfigError",
    "DeliveryError",
    "HealthHandler",
    "MetricsHandler",
    "MoesifDurableError",
    "MoesifMiddleware",
    "PermanentError",
    "RedirectError",
    "RetryableError",
    "SpoolBeforeSendMixin",
    "__version__",
]
