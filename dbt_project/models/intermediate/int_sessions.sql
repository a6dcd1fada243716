-- One row per search session: who searched what, and what came of it.
select
    session_id,
    min(user_id) as user_id,
    min(query) as query,
    min(ds) as ds,
    min(ts) as started_at,
    {{ engagement_counts('e') }}
from {{ ref('stg_events') }} as e
group by session_id
