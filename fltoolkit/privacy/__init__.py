"""Privacy mechanisms: client-local embedding tables that never leave the client."""

from fltoolkit.privacy.local_tables import LocalTableStore

__all__ = ["LocalTableStore"]
