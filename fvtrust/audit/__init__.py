"""Audit: flag the units of a layer whose feature visualizations cannot be trusted."""
from .core import FLAG_AT, THRESHOLDS, AuditResult, AuditSettings, audit

__all__ = ["audit", "AuditResult", "AuditSettings", "THRESHOLDS", "FLAG_AT"]
