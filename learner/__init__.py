"""Background learning: the teacher log writer, the durable job queue and its runner, fact
extraction (rules or an LLM), and the triggers of learning runs; feedback, domain activations,
the dream agents and the distillation datasets."""

from learner.datasets import Dataset, build_dataset
from learner.domains import DomainShare, domain_report
from learner.dream import (
    PreloadCache,
    PreloadedMemory,
    Preloader,
    consolidate,
    dream,
    forget,
    optimize,
    preload,
)
from learner.extract import Fact, extract_facts
from learner.extractor import ExtractedFact, ExtractionError, Extractor, RulesExtractor
from learner.feedback import (
    MAX_CORRECTION_CHARS,
    RATINGS,
    FeedbackResult,
    UnknownResponse,
    give_feedback,
)
from learner.llm_extract import (
    LiteLLMCompleter,
    LLMExtractor,
    LocalModelCompleter,
    OpenAICompatibleCompleter,
)
from learner.queue import LeaseLost, apply_facts, run_job, run_jobs
from learner.runner import JobRunner
from learner.teacher import assemble
from learner.triggers import LearnRun, TriggerPolicy, find_consolidator, learn, run_due
from learner.worker import Exchange, LearnerWorker

__all__ = [
    "MAX_CORRECTION_CHARS",
    "RATINGS",
    "Dataset",
    "DomainShare",
    "Exchange",
    "ExtractedFact",
    "ExtractionError",
    "Extractor",
    "Fact",
    "FeedbackResult",
    "JobRunner",
    "LLMExtractor",
    "LearnRun",
    "LearnerWorker",
    "LeaseLost",
    "LiteLLMCompleter",
    "LocalModelCompleter",
    "OpenAICompatibleCompleter",
    "PreloadCache",
    "PreloadedMemory",
    "Preloader",
    "RulesExtractor",
    "TriggerPolicy",
    "UnknownResponse",
    "apply_facts",
    "assemble",
    "build_dataset",
    "consolidate",
    "domain_report",
    "dream",
    "extract_facts",
    "find_consolidator",
    "forget",
    "give_feedback",
    "learn",
    "optimize",
    "preload",
    "run_due",
    "run_job",
    "run_jobs",
]
