"""Model components: WAP Transformer, span masking, online k-means, adapter, SAP."""

from serray.models.adapter import Adapter, AdapterOutput
from serray.models.kmeans import OnlineKMeans
from serray.models.masking import span_mask
from serray.models.sap import SAP, SAPClassifier
from serray.models.wap import WAPTransformer

__all__ = [
    "Adapter",
    "AdapterOutput",
    "OnlineKMeans",
    "SAP",
    "SAPClassifier",
    "WAPTransformer",
    "span_mask",
]
