"""Plain text as training rows: pretraining documents mixed into midtraining (the MacBook recipe's
"pretraining data mixed with conversations"). An example is {"text": ...}; every token of it is a
target, as in pretraining (conversation.render_example). At most `limit` documents are read, in the
files' order: a pretraining shard holds far more than a mixture wants."""

from __future__ import annotations

import itertools
from pathlib import Path

from picochat.common import PicochatError
from picochat.tasks.base import ListTask

DEFAULT_LIMIT = 20_000


class Text(ListTask):
    name = "text"
    kind = "generative"

    def __init__(self, path: str | Path, limit: int = DEFAULT_LIMIT):
        from picochat.data.sources import iter_documents  # the data package owns the formats
        if limit < 1:
            raise PicochatError(f"text: limit must be at least 1, not {limit}")
        super().__init__([{"text": doc} for doc in itertools.islice(iter_documents([path]), limit)])
