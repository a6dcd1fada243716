"""The nightly refresh: re-embed new and changed products with the serving model (no retraining),
check the new collection and swap the alias; then a smoke query, and the user states, product embeddings
and files of versions that no longer serve pruned."""

from __future__ import annotations

from airflow.sdk import dag, task

from dags.common import START_DATE, default_args, index_pool


@dag(dag_id="uer_nightly_index_refresh", schedule="0 3 * * *", start_date=START_DATE, catchup=False,
     max_active_runs=1, default_args=default_args(), tags=["uer"], doc_md=__doc__)
def uer_nightly_index_refresh() -> None:
    @task(pool=index_pool())
    def refresh_index() -> dict:
        from retrieval_core.settings import get_settings
        from serving.refresh import refresh_index as refresh

        report = refresh(get_settings())
        return {"collection": report.index.collection, "newly_encoded": report.newly_encoded,
                "checks": report.checks, "seconds": report.seconds}

    @task
    def prune_retired_versions(published: dict) -> dict[str, list[str]]:
        """The user states, product embeddings and files of versions whose last collection the refresh just
        pruned."""
        from retrieval_core.settings import get_settings
        from serving.retention import prune_retired_versions as prune

        return prune(get_settings())

    @task
    def smoke_query(published: dict) -> dict:
        from retrieval_core.settings import get_settings
        from serving.retriever import smoke_query as run_smoke

        return run_smoke(get_settings())

    published = refresh_index()
    smoke_query(published)
    prune_retired_versions(published)


uer_nightly_index_refresh()
