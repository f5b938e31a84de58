"""How the code location talks to systems: the event store and the EDW."""

from resources.event_store import EventStoreResource
from resources.warehouse import WarehouseResource

__all__ = ["EventStoreResource", "WarehouseResource"]
