{{ config(materialized='incremental', incremental_strategy='delete+insert', unique_key='ds') }}
-- What the query tower reads about a user, as of the close of each day they were active: recent
-- queries, shops of clicked products, words of clicked titles, tags of purchases (newest first).
{% set window = var('history_window_days') %}
{% set n = var('history_list_size') %}
{% set n_terms = var('history_terms_size') %}
with days as ({{ days_to_build(ref('stg_events')) }}),
active as (
    select distinct e.ds, e.user_id
    from {{ ref('stg_events') }} as e
    join days as d on d.ds = e.ds
    where e.user_id is not null
),
recent as (
    select a.ds as as_of, e.*
    from active as a
    join {{ ref('stg_events') }} as e
        on e.user_id = a.user_id and e.ds <= a.ds and e.ds > a.ds - {{ window }}
),
products as (
    select product_id, shop_id, title, tags
    from {{ ref('stg_catalogue') }}
    where is_first_version
),
queries as (
    select as_of, user_id, query as item, max(ts) as last_seen
    from recent
    where event_type = 'impression'
    group by as_of, user_id, query
),
shops as (
    select r.as_of, r.user_id, p.shop_id as item, max(r.ts) as last_seen
    from recent as r join products as p on p.product_id = r.product_id
    where r.event_type = 'click'
    group by r.as_of, r.user_id, p.shop_id
),
click_words as (
    select r.as_of, r.user_id, r.ts,
           unnest(string_to_array(regexp_replace(lower(p.title), '[^a-z0-9]+', ' ', 'g'), ' ')) as item
    from recent as r join products as p on p.product_id = r.product_id
    where r.event_type = 'click'
),
terms as (
    select as_of, user_id, item, max(ts) as last_seen
    from click_words
    where length(item) > 2
    group by as_of, user_id, item
),
purchase_tags as (
    select r.as_of, r.user_id, r.ts, unnest(p.tags) as item
    from recent as r join products as p on p.product_id = r.product_id
    where r.event_type = 'purchase'
),
tags as (
    select as_of, user_id, item, max(ts) as last_seen
    from purchase_tags
    group by as_of, user_id, item
),
counts as (
    select as_of, user_id,
           count(distinct session_id) as sessions_{{ window }}d,
           count(*) filter (where event_type = 'click') as clicks_{{ window }}d,
           count(*) filter (where event_type = 'purchase') as purchases_{{ window }}d
    from recent
    group by as_of, user_id
),
{% set lists = [('queries', 'recent_queries', n), ('shops', 'recent_shops', n),
                 ('terms', 'recent_click_terms', n_terms), ('tags', 'purchased_tags', n_terms)] %}
{% for source, column, size in lists %}
newest_{{ source }} as (
    select as_of, user_id, (array_agg(item order by last_seen desc, item))[1:{{ size }}] as {{ column }}
    from {{ source }} group by as_of, user_id
){{ "," if not loop.last }}
{% endfor %}
select
    c.user_id,
    c.as_of as ds,
    {{ day_closed_at('c.as_of') }} as event_timestamp,
    coalesce(u.country, 'ZZ') as country,
    q.recent_queries,
    s.recent_shops,
    t.recent_click_terms,
    g.purchased_tags,
    c.sessions_{{ window }}d,
    c.clicks_{{ window }}d,
    c.purchases_{{ window }}d
from counts as c
left join newest_queries as q on q.as_of = c.as_of and q.user_id = c.user_id
left join newest_shops as s on s.as_of = c.as_of and s.user_id = c.user_id
left join newest_terms as t on t.as_of = c.as_of and t.user_id = c.user_id
left join newest_tags as g on g.as_of = c.as_of and g.user_id = c.user_id
left join {{ ref('stg_users') }} as u on u.user_id = c.user_id
