-- The listing in force for each product on each landed day (the latest version up to that day).
with days as (select distinct ds from {{ ref('stg_events') }}),
versions as (
    select
        c.*,
        lead(c.ds) over (partition by c.product_id order by c.ds) as superseded_on
    from {{ ref('stg_catalogue') }} as c
)
select d.ds as as_of, v.*
from days as d
join versions as v
    on v.ds <= d.ds and (v.superseded_on is null or v.superseded_on > d.ds)
