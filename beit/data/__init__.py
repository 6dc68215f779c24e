"""Data: image folders (robust loading), and later the embedded dataset and the BEiT views.

Every dataset here yields PIL RGB images (or whatever its ``transform`` makes of them), optionally with an
integer label, so training code can take any of them.
"""

from .folder import IMAGE_EXTENSIONS, DataError, ImageFolder, list_images, load_image

__all__ = ["IMAGE_EXTENSIONS", "DataError", "ImageFolder", "list_images", "load_image"]
