"""Build (or load) the native CPU kernels now, so the first Scout or Oracle does not wait."""

import logging
import sys

from . import NativeUnavailable, load

logging.basicConfig(level=logging.INFO, format="%(message)s")
try:
    load()
except NativeUnavailable as exc:
    print(f"native CPU kernels unavailable: {exc}; the eager path will be used", file=sys.stderr)
    sys.exit(1)
print("native CPU kernels ready")
