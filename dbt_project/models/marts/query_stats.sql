-- Query frequency over the trailing window and its class: head queries carry the first
-- head_traffic_share of sessions, torso the next torso_traffic_share, tail the rest.
{% set window = var('history_window_days') %}
with counts as (
    select query, count(*) as sessions, sum(purchases) as purchases
    from {{ ref('int_sessions') }}
    where ds <= cast('{{ var("ds") }}' as date) and ds > cast('{{ var("ds") }}' as date) - {{ window }}
    group by query
),
ranked as (
    select
        *,
        row_number() over (order by sessions desc, query) as frequency_rank,
        cast(sum(sessions) over (order by sessions desc, query rows unbounded preceding) as double precision)
            / sum(sessions) over () as cumulative_share
    from counts
)
select
    query,
    cast('{{ var("ds") }}' as date) as ds,
    sessions,
    purchases,
    frequency_rank,
    cumulative_share,
    case
        when cumulative_share - cast(sessions as double precision) / sum(sessions) over ()
             < {{ var('head_traffic_share') }} then 'head'
        when cumulative_share - cast(sessions as double precision) / sum(sessions) over ()
             < {{ var('head_traffic_share') + var('torso_traffic_share') }} then 'torso'
        else 'tail'
    end as query_class
from ranked
