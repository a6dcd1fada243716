-- Engagement events attributed to the search that led to them: the impression of the same product
-- in the same session (its query and position). Unattributed engagement is kept, flagged.
with impressions as (
    select session_id, product_id, min(position) as position, min(ts) as shown_at
    from {{ ref('stg_events') }}
    where event_type = 'impression'
    group by session_id, product_id
)
select
    e.event_id,
    e.ts,
    e.ds,
    e.user_id,
    e.session_id,
    e.query,
    e.product_id,
    e.event_type,
    coalesce(i.position, e.position) as position,
    i.session_id is not null as attributed
from {{ ref('stg_events') }} as e
left join impressions as i
    on i.session_id = e.session_id and i.product_id = e.product_id and i.shown_at <= e.ts
where e.event_type <> 'impression'
