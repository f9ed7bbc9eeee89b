# The pack's version; pyproject.toml carries the same string (a test checks they agree).
PACK_VERSION = "0.1.0"
