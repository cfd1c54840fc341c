"""pocketlm: compress a Hugging Face causal LM into the best model that fits a device."""
__version__ = "0.1.0"

from .errors import PocketError  # noqa: E402
from .context import CalibrationConfig  # noqa: E402
from .measure import evaluate, perplexity  # noqa: E402
from .models import load  # noqa: E402
from .pipeline import compress  # noqa: E402
from .recipe import Recipe  # noqa: E402

__all__ = ["PocketError", "CalibrationConfig", "compress", "evaluate", "perplexity", "load", "Recipe"]
