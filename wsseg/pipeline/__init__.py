"""The run machinery: a recipe is a list of Stage objects (wsseg.runner.RECIPE_STAGES) sharing one
RunContext; the StageExecutor owns their cache, timers and rank rules; the RunLayout owns the paths."""

from wsseg.pipeline.context import MapProducer, RunContext, Stage
from wsseg.pipeline.executor import CACHE_FORMAT, StageExecutor, StageTimer, fingerprint
from wsseg.pipeline.layout import RunLayout

__all__ = ["CACHE_FORMAT", "MapProducer", "RunContext", "RunLayout", "Stage", "StageExecutor", "StageTimer",
           "fingerprint"]
