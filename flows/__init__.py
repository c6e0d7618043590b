"""Prefect flows: the end-to-end pipeline and the stage flows (flows/pipeline.py).

`tasks` is imported first: it sets PREFECT_LOGGING_EXTRA_LOGGERS=glm before Prefect configures
logging, so glm's log lines appear in the flow and task run logs.
"""

import glm_pipeline.tasks  # noqa: F401  (must precede every Prefect import)
