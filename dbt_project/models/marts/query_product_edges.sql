{{ config(materialized='incremental', incremental_strategy='delete+insert', unique_key='ds') }}
-- The query-product engagement graph, one day of weighted edges per row (consumers sum a window).
with days as ({{ days_to_build(ref('stg_events')) }})
select
    e.ds,
    e.query,
    e.product_id,
    count(*) filter (where e.event_type = 'click') as clicks,
    count(*) filter (where e.event_type = 'favorite') as favorites,
    count(*) filter (where e.event_type = 'add_to_cart') as carts,
    count(*) filter (where e.event_type = 'purchase') as purchases,
    sum(case e.event_type when 'click' then 1 when 'favorite' then 2 when 'add_to_cart' then 3
                          when 'purchase' then 5 else 0 end) as weight
from {{ ref('stg_events') }} as e
join days as d on d.ds = e.ds
where e.event_type <> 'impression'
group by e.ds, e.query, e.product_id
