"""Sparsity-level schedulers."""

from prunekit.scheduler.base import BaseScheduler
from prunekit.scheduler.cubic import CubicSL
from prunekit.scheduler.lambda_sl import LambdaSL

__all__ = ["BaseScheduler", "CubicSL", "LambdaSL"]
