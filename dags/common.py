"""What every DAG of the platform shares: retries with backoff, failure notification, the settings.

DAG files stay thin: each task calls one typed stage function that the ``uer`` CLI also calls.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import urllib.request
from typing import Any

from retrieval_core.settings import Settings, get_settings

log = logging.getLogger(__name__)
START_DATE = dt.datetime(2026, 9, 1, tzinfo=dt.UTC)


def notify_failure(context: dict[str, Any]) -> None:
    """Log the failed task; also POST it to the webhook from the settings, if one is configured."""
    ti = context.get("task_instance")
    message = {"dag": getattr(ti, "dag_id", None), "task": getattr(ti, "task_id", None),
               "run_id": context.get("run_id"), "error": str(context.get("exception"))[:2000]}
    log.error("task failed: %s", message)
    hook = get_settings().airflow.notify_webhook
    if hook is None:
        return
    request = urllib.request.Request(hook.get_secret_value(), data=json.dumps(message).encode(),
                                     headers={"content-type": "application/json"}, method="POST")
    try:
        urllib.request.urlopen(request, timeout=10).close()
    except OSError as exc:  # a notification failure must not hide the task failure
        log.error("failure webhook unreachable: %s", exc)


def default_args(settings: Settings | None = None) -> dict[str, Any]:
    settings = settings or get_settings()
    return {"retries": settings.airflow.retries,
            "retry_delay": dt.timedelta(seconds=settings.airflow.retry_delay_s),
            "retry_exponential_backoff": True, "max_retry_delay": dt.timedelta(minutes=30),
            "on_failure_callback": notify_failure}


def index_pool() -> str:
    """The one-slot pool of the tasks that publish a collection: the daily and the nightly DAG queue there rather
    than build side by side (``serving.refresh.unchanged_since`` also refuses a swap that would undo a move made
    meanwhile)."""
    return get_settings().airflow.index_pool


def day_of(logical_date: dt.datetime | str) -> dt.date:
    """The data day a run processes: its logical date (the day the run covers)."""
    if isinstance(logical_date, str):
        return dt.date.fromisoformat(logical_date[:10])
    return logical_date.date()


def airflow_environment(settings: Settings) -> dict[str, str]:
    """Environment for the ``airflow`` CLI in the embedded profile: SQLite metadata DB under the data
    directory, this folder as the DAG folder, no examples, the API server on loopback."""
    from retrieval_core.settings import PROJECT_ROOT

    home = settings.data_dir / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    return {"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": "8080", "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "UER_PROFILE": settings.profile, "UER_DATA_DIR": str(settings.data_dir),
            "UER_ARTIFACTS_DIR": str(settings.artifacts_dir)}
