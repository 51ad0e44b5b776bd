from .modifier import *  # noqa: F401,F403
from .modifier import REPORT_FILE, __all__, quantizable_masks, search_batches, write_pruned_config  # noqa: F401
