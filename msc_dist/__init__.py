"""msc-dist: distributed Mean-Shifted Contrastive (MSC) anomaly detection.

Method: Reiss & Hoshen, "Mean-Shifted Contrastive Loss for Anomaly Detection" (arXiv 2106.03844).
"""

__version__ = "0.1.0"
