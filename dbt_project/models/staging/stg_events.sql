-- Typed, deduplicated search events up to the day being built; queries normalised for grouping.
with ranked as (
    select
        event_id,
        ts,
        user_id,
        session_id,
        lower(trim(query)) as query,
        product_id,
        event_type,
        position,
        cast(ds as date) as ds,
        row_number() over (partition by event_id order by ts) as copy_number
    from {{ source('raw', 'events') }}
    where cast(ds as date) <= cast('{{ var("ds") }}' as date)
)
select event_id, ts, user_id, session_id, query, product_id, event_type, position, ds
from ranked
where copy_number = 1
