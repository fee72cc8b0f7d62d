"""UPerNet semantic segmentation on any backbone."""
from .models import UPerNet, build_model, list_models, load_model

__version__ = "0.1.0"
__all__ = ["UPerNet", "build_model", "list_models", "load_model", "__version__"]
