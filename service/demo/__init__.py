"""Synthetic LSST-layout visits (``forcedphot demo``) and the embedded demo repository."""

from forcedphot.demo.repository import DemoVisitId, ensure_demo_repository
from forcedphot.demo.survey import make_demo_survey
from forcedphot.demo.visit import CALIBRATION_NJY_PER_COUNT, make_demo_visit

__all__ = ["CALIBRATION_NJY_PER_COUNT", "DemoVisitId", "ensure_demo_repository", "make_demo_survey", "make_demo_visit"]
