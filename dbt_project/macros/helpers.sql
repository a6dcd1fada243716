{# The moment a day's data becomes known: midnight UTC after day `d` closes. Every mart stamps its
   rows with it, so a point-in-time join at time t only sees days that ended before t. #}
{% macro day_closed_at(d) %}{{ return(adapter.dispatch('day_closed_at', 'uer')(d)) }}{% endmacro %}

{% macro default__day_closed_at(d) %}(cast({{ d }} + 1 as timestamp) at time zone 'UTC'){% endmacro %}

{% macro duckdb__day_closed_at(d) %}timezone('UTC', cast({{ d }} + 1 as timestamp)){% endmacro %}

{# Days to (re)build: exactly var('ds') on an incremental run, every landed day up to it otherwise. #}
{% macro days_to_build(events_relation) %}
    select distinct ds from {{ events_relation }}
    {% if is_incremental() %}
    where ds = cast('{{ var("ds") }}' as date)
    {% endif %}
{% endmacro %}

{# Fresh statistics after a table is (re)built, so Postgres plans the marts' joins well. #}
{% macro analyze_table(relation) %}{{ return(adapter.dispatch('analyze_table', 'uer')(relation)) }}{% endmacro %}
{% macro default__analyze_table(relation) %}analyze {{ relation }}{% endmacro %}
{% macro duckdb__analyze_table(relation) %}select 1{% endmacro %}


{# Engagement counts of a set of events `e` (grouped by the caller). #}
{% macro engagement_counts(e) %}
    count(*) filter (where {{ e }}.event_type = 'impression') as impressions,
    count(*) filter (where {{ e }}.event_type = 'click') as clicks,
    count(*) filter (where {{ e }}.event_type = 'favorite') as favorites,
    count(*) filter (where {{ e }}.event_type = 'add_to_cart') as carts,
    count(*) filter (where {{ e }}.event_type = 'purchase') as purchases
{% endmacro %}
