"""Kept for old command lines and scripts: the sleep task is ``runner.tasks.sleep`` now."""
from runner.tasks.sleep import SleepTask  # noqa: F401
