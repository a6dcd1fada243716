-- The latest known row per user, up to ds.
with ranked as (
    select
        user_id,
        upper(country) as country,
        signup_date,
        cast(ds as date) as ds,
        row_number() over (partition by user_id order by ds desc) as recency
    from {{ source('raw', 'users') }}
    where cast(ds as date) <= cast('{{ var("ds") }}' as date)
)
select user_id, country, signup_date, ds
from ranked
where recency = 1
