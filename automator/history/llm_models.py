"""History tables of the model transform (response cache, batches): filled by the openai.transform work."""

from __future__ import annotations
