"""Prediction APIs: the interface attacks use, the in-process implementation, evaluation."""

from mirage.api.alarm import AlarmAction, AlarmPolicy
from mirage.api.base import (
    PredictionAPI,
    QueryBudgetExceeded,
    QueryLedger,
    QueryRefused,
    check_images,
)
from mirage.api.detection import PradaConfig, PradaDetector
from mirage.api.evaluate import DefendedAccuracy, accuracy, defended_accuracy
from mirage.api.inprocess import InProcessAPI, clean_posteriors

__all__ = [
    "AlarmAction",
    "AlarmPolicy",
    "DefendedAccuracy",
    "InProcessAPI",
    "PradaConfig",
    "PradaDetector",
    "PredictionAPI",
    "QueryBudgetExceeded",
    "QueryLedger",
    "QueryRefused",
    "accuracy",
    "check_images",
    "clean_posteriors",
    "defended_accuracy",
]
