"""eventlog: a durable, replayable event log on PostgreSQL.

Publishing appends one row to an append-only table and rings a NOTIFY doorbell on
the channel of each of the event's topics, in one transaction. Subscriptions catch
up from the last event id they saw, then follow the log live; replay reads by id.
"""

from __future__ import annotations

from ._channels import channel_for
from ._encoding import MAX_TOPIC_BYTES, MAX_TOPICS_PER_EVENT, MAX_TYPE_BYTES
from ._models import Event, NewEvent
from ._outbox import PendingEvent
from ._settings import Settings
from ._sql import EventFilter
from ._subscription import AsyncSubscription, Subscription, SubscriptionState
from .errors import (
    AppendOnlyViolation,
    ConfigurationError,
    ConnectionFailed,
    DatabaseError,
    DataTooLarge,
    EventLogError,
    InvalidData,
    InvalidEvent,
    InvalidEventType,
    InvalidQuery,
    InvalidTopic,
    SchemaNotFound,
    SubscriptionStateError,
    TransactionStateError,
)
from .log import AsyncEventLog, AsyncTransaction, EventLog, Transaction

__version__ = "0.1.0"

__all__ = [
    "MAX_TOPICS_PER_EVENT",
    "MAX_TOPIC_BYTES",
    "MAX_TYPE_BYTES",
    "AppendOnlyViolation",
    "AsyncEventLog",
    "AsyncSubscription",
    "AsyncTransaction",
    "ConfigurationError",
    "ConnectionFailed",
    "DataTooLarge",
    "DatabaseError",
    "Event",
    "EventFilter",
    "EventLog",
    "EventLogError",
    "InvalidData",
    "InvalidEvent",
    "InvalidEventType",
    "InvalidQuery",
    "InvalidTopic",
    "NewEvent",
    "PendingEvent",
    "SchemaNotFound",
    "Settings",
    "Subscription",
    "SubscriptionState",
    "SubscriptionStateError",
    "Transaction",
    "TransactionStateError",
    "channel_for",
]
