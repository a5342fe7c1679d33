"""Session-wide test settings.

Model hubs are unreachable here and in CI: huggingface_hub reads HF_HUB_OFFLINE when it is first
imported, so it must be set before any test module imports transformers; otherwise a hub id
costs ~20 s of retries before failing.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
