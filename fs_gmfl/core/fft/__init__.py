"""Federated full fine-tuning of targeted weight matrices (the FedKRSO paper's FFT baseline)."""

from fs_gmfl.core.fft.client import FullWeightClient
from fs_gmfl.core.fft.config import FFTConfig

__all__ = ["FFTConfig", "FullWeightClient"]
