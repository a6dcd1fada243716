-- One row per search session: who searched what, and what came of it.
select
    session_id,
    min(user_id) as user_id,
    min(query) as query,
    min(ds) as ds,
    min(ts) as started_at,
    count(*) filter (where event_type = 'impression') as impressions,
    count(*) filter (where event_type = 'click') as clicks,
    count(*) filter (where event_type = 'favorite') as favorites,
    count(*) filter (where event_type = 'add_to_cart') as carts,
    count(*) filter (where event_type = 'purchase') as purchases
from {{ ref('stg_events') }}
group by session_id
