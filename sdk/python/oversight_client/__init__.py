"""oversight-client: log deployed-model episodes to the oversight monitor from an application.

Lightweight by design (httpx only; kafka-python for :class:`KafkaClient`, imported on use): it
never imports the monitor, torch or transformers. See :class:`Client`.
"""

from oversight_client.buffer import BufferFull, ClientClosed
from oversight_client.core import BaseClient
from oversight_client.episode import (
    ContentPart,
    Episode,
    EpisodeV1,
    EpisodeV2,
    Message,
    Role,
    ToolCall,
    chat_episode,
    message,
    new_episode_id,
    text_episode,
    tool_call,
)
from oversight_client.http_transport import Client
from oversight_client.kafka_transport import KafkaClient
from oversight_client.retry import Backoff
from oversight_client.stats import Result, Stats, Status

__version__ = "0.1.0"

__all__ = [
    "Backoff",
    "BaseClient",
    "BufferFull",
    "Client",
    "ClientClosed",
    "ContentPart",
    "Episode",
    "EpisodeV1",
    "EpisodeV2",
    "KafkaClient",
    "Message",
    "Result",
    "Role",
    "Stats",
    "Status",
    "ToolCall",
    "__version__",
    "chat_episode",
    "message",
    "new_episode_id",
    "text_episode",
    "tool_call",
]
