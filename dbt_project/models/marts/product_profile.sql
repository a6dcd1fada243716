{{ config(materialized='incremental', incremental_strategy='delete+insert', unique_key='ds') }}
-- The product tower's text and categorical inputs: one row per product and day its listing changed.
-- A first listing is known from its creation; a later change from the close of its day.
select
    c.product_id,
    c.ds,
    case when c.is_first_version then c.created_at else {{ day_closed_at('c.ds') }} end as event_timestamp,
    c.shop_id,
    c.title,
    c.tags,
    c.category_path,
    split_part(c.category_path, ' > ', 1) as top_category,
    c.price,
    c.currency,
    c.shop_country,
    c.created_at
from {{ ref('stg_catalogue') }} as c
where c.ds in ({{ days_to_build(ref('stg_catalogue')) }})
