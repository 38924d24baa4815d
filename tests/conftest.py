"""Shared test setup. Tests never use the network beyond loopback: hub access is switched off here so an
accidental `from_pretrained("some/hub-id")` fails fast instead of hanging."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
