"""unet_core: the U-Net of Ronneberger et al. (2015) for microscopy batch segmentation.

The model, loss, weight maps, tiling, I/O, training, inference, metrics and the report of
the unet-pipeline Snakemake workflow. Nothing here imports snakemake.
"""

from .loss import weighted_cross_entropy
from .model import UNet
from .overlap_tile import predict_tiled
from .weights import instances_from_binary, weight_map

__all__ = ["UNet", "weighted_cross_entropy", "weight_map", "instances_from_binary", "predict_tiled"]
__version__ = "0.1.0"
