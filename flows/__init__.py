"""Prefect flows: the end-to-end pipeline and the stage flows (flows/pipeline.py), serve, deploy, the CLI.

Importing this package imports nothing else: `glm-pipeline` (flows/cli.py) must install its own
logging before Prefect is imported, or Prefect's console handler prints every traceback.
flows/pipeline.py imports glm_pipeline.tasks before Prefect (it sets the logging environment).
"""
