from .pruner import *  # noqa: F401,F403
from .pruner import __all__  # noqa: F401
