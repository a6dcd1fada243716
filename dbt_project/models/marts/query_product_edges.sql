{{ config(materialized='incremental', incremental_strategy='delete+insert', unique_key='ds') }}
-- The query-product engagement graph, one day of weighted edges per row (consumers sum a window);
-- a pair only shown, never engaged, is no edge.
with days as ({{ days_to_build(ref('stg_events')) }})
select
    e.ds,
    e.query,
    e.product_id,
    {{ engagement_counts('e') }},
    sum(case e.event_type when 'click' then 1 when 'favorite' then 2 when 'add_to_cart' then 3
                          when 'purchase' then 5 else 0 end) as weight
from {{ ref('stg_events') }} as e
join days as d on d.ds = e.ds
group by e.ds, e.query, e.product_id
having count(*) filter (where e.event_type <> 'impression') > 0
