"""``medtl serve``: a bundle (or a run, exported on the fly) over HTTP, with a web page.

Serving a bundle needs onnxruntime, NumPy, Pillow, pydicom, FastAPI and uvicorn; PyTorch only
when a run directory is served (for Grad-CAM).
"""

from medtl.serving.app import Settings, create_app
from medtl.serving.model import Served, load_served

__all__ = ["Served", "Settings", "create_app", "load_served"]
