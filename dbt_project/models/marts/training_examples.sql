-- (query, user or null, product, interaction, timestamp) with a time-based split as of var('ds'):
-- the last test_days are the test window, the validation_days before them the validation window.
{% set test_days = var('test_days') %}
{% set validation_days = var('validation_days') %}
select
    g.event_id as example_id,
    g.ts as event_timestamp,
    g.ds,
    g.query,
    g.user_id,
    g.product_id,
    g.event_type as interaction,
    g.position,
    g.attributed,
    g.session_id,
    case
        when g.ds > cast('{{ var("ds") }}' as date) - {{ test_days }} then 'test'
        when g.ds > cast('{{ var("ds") }}' as date) - {{ test_days + validation_days }} then 'validation'
        else 'train'
    end as split
from {{ ref('int_engagements') }} as g
