"""Background learning: the teacher log writer and the first extraction step."""

from learner.extract import Fact, extract_facts
from learner.teacher import assemble
from learner.worker import Exchange, LearnerWorker

__all__ = ["Exchange", "Fact", "LearnerWorker", "assemble", "extract_facts"]
