"""Privacy mechanisms: client-local embedding tables that never leave the client, and the
arithmetic of simulated secure aggregation."""

from fltoolkit.privacy.local_tables import LocalTableStore
from fltoolkit.privacy.secure_sum import (
    FixedPoint,
    SecureAggregationFailed,
    SecureSumRound,
    setup_upload_bytes,
    upload_bytes,
)

__all__ = [
    "FixedPoint",
    "LocalTableStore",
    "SecureAggregationFailed",
    "SecureSumRound",
    "setup_upload_bytes",
    "upload_bytes",
]
