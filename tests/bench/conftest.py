"""The bench/ scripts import their shared module as ``_common`` (they run as ``python bench/<name>.py``)."""

import sys

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "bench"))
