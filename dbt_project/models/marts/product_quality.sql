{{ config(materialized='incremental', incremental_strategy='delete+insert', unique_key='ds') }}
-- Quality signals over a trailing window, as of each day, bucketed by quantiles (as the paper does).
{% set window = var('quality_window_days') %}
{% set buckets = var('quantile_buckets') %}
with days as ({{ days_to_build(ref('stg_events')) }}),
engagement as (
    select
        d.ds,
        e.product_id,
        {{ engagement_counts('e') }}
    from days as d
    join {{ ref('stg_events') }} as e
        on e.ds <= d.ds and e.ds > d.ds - {{ window }}
    group by d.ds, e.product_id
),
stats as (
    select
        g.product_id,
        g.ds,
        g.impressions as impressions_{{ window }}d,
        cast(g.clicks as double precision) / nullif(g.impressions, 0) as ctr,
        cast(g.favorites as double precision) / nullif(g.impressions, 0) as favorite_rate,
        cast(g.carts as double precision) / nullif(g.impressions, 0) as cart_rate,
        cast(g.purchases as double precision) / nullif(g.impressions, 0) as purchase_rate,
        v.price,
        coalesce(v.rating, 0) as rating,
        v.review_count,
        g.ds - cast(v.created_at as date) as age_days
    from engagement as g
    join {{ ref('int_product_versions') }} as v
        on v.product_id = g.product_id and v.as_of = g.ds
    where g.impressions > 0
)
select
    product_id,
    ds,
    {{ day_closed_at('ds') }} as event_timestamp,
    impressions_{{ window }}d,
    coalesce(ctr, 0) as ctr,
    coalesce(favorite_rate, 0) as favorite_rate,
    coalesce(cart_rate, 0) as cart_rate,
    coalesce(purchase_rate, 0) as purchase_rate,
    price,
    rating,
    review_count,
    age_days,
    ntile({{ buckets }}) over (partition by ds order by ctr, product_id) as ctr_bucket,
    ntile({{ buckets }}) over (partition by ds order by purchase_rate, product_id) as purchase_rate_bucket,
    ntile({{ buckets }}) over (partition by ds order by rating, product_id) as rating_bucket,
    ntile({{ buckets }}) over (partition by ds order by review_count, product_id) as review_count_bucket,
    ntile({{ buckets }}) over (partition by ds order by age_days, product_id) as age_bucket,
    ntile({{ buckets }}) over (partition by ds order by price, product_id) as price_bucket
from stats
