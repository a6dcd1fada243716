-- Every version of every product listing (one per product and day it changed), up to ds.
with ranked as (
    select
        product_id,
        shop_id,
        trim(title) as title,
        tags,
        lower(trim(category_path)) as category_path,
        price,
        currency,
        shop_country,
        created_at,
        rating,
        review_count,
        cast(ds as date) as ds,
        row_number() over (partition by product_id, ds order by created_at desc) as copy_number
    from {{ source('raw', 'catalogue') }}
    where cast(ds as date) <= cast('{{ var("ds") }}' as date)
)
select
    product_id, shop_id, title, tags, category_path, price, currency, shop_country, created_at,
    rating, review_count, ds,
    row_number() over (partition by product_id order by ds) = 1 as is_first_version
from ranked
where copy_number = 1
