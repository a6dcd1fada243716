"""Request filters → a Milvus boolean expression, built only from validated values.

Callers never send expression text: they send typed values, each checked against a strict pattern or
range, and string values are emitted as JSON string literals (quotes and backslashes escaped), so no
filter value can add an operator or a clause.
"""

from __future__ import annotations

import json
from typing import Annotated

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, WithJsonSchema, model_validator

# Category paths look like "pets > collars" (a level never ends the path); countries are ISO-3166 alpha-2 codes.
CATEGORY_PATTERN = r"^[a-z0-9_&/ .,>-]{0,127}[a-z0-9_&/.,-]$"
COUNTRY_PATTERN = r"^[A-Z]{2}$"
CURRENCY_PATTERN = r"^[A-Z]{3}$"  # ISO 4217
# Between a category path's levels.
CATEGORY_SEPARATOR = " > "


def _as_stored(value: object) -> object:
    """A category as the catalogue stores it (dbt's stg_catalogue: lower(trim(path))): "Jewelry " was accepted and
    matched nothing."""
    return value.strip(" ").lower() if isinstance(value, str) else value


# The JSON schema (OpenAPI) states the rule the normalised value must meet; the validator alone would hide it.
Category = Annotated[str, BeforeValidator(_as_stored), StringConstraints(pattern=CATEGORY_PATTERN),
                     WithJsonSchema({"type": "string", "pattern": CATEGORY_PATTERN, "maxLength": 128,
                                     "description": "lower case after trimming spaces (as the catalogue stores it)"})]
Country = Annotated[str, StringConstraints(pattern=COUNTRY_PATTERN)]
Currency = Annotated[str, StringConstraints(pattern=CURRENCY_PATTERN)]


class Filters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # An empty list is refused, not read as "no filter": a caller that sends [] wants nothing, not everything.
    category: list[Category] | None = Field(None, min_length=1, max_length=50,
                                            description="exact category paths (any of)")
    category_prefix: Category | None = Field(None, description="a category subtree: the path given and every path "
                                                               "below it (\"pets\" matches \"pets > collars\", "
                                                               "not \"petsupplies\")")
    shop_country: list[Country] | None = Field(None, min_length=1, max_length=50,
                                               description="ISO country codes (any of)")
    # strict: a JSON number only (true, "12.5" were read as 1.0 and 12.5)
    price_min: float | None = Field(None, ge=0, le=1e7, strict=True, description="in `currency`, inclusive")
    price_max: float | None = Field(None, ge=0, le=1e7, strict=True, description="in `currency`, inclusive")
    currency: Currency | None = Field(None, description="ISO 4217 code: only listings priced in it (prices are "
                                                        "never converted); required with price_min / price_max")

    @model_validator(mode="after")
    def _price_range(self) -> Filters:
        if self.price_min is not None and self.price_max is not None and self.price_min > self.price_max:
            raise ValueError(f"price_min {self.price_min} is above price_max {self.price_max}")
        if (self.price_min is not None or self.price_max is not None) and self.currency is None:
            raise ValueError("price_min / price_max need a currency (ISO 4217, e.g. \"USD\"): each listing is priced "
                             "in its shop's currency and never converted, so a bare amount would compare dollars "
                             "with euros")
        return self

    def fields(self) -> set[str]:
        """The collection's scalar fields the expression reads."""
        used = {"category_path": self.category or self.category_prefix, "shop_country": self.shop_country,
                "price": self.price_min is not None or self.price_max is not None, "currency": self.currency}
        return {name for name, value in used.items() if value}

    def expression(self, float32_prices: bool = False) -> str:
        """The Milvus filter expression ('' when no filter is set). With ``float32_prices`` (a collection that holds
        prices as FLOAT), each price bound is written as the float32 value the collection holds for that price, so
        that a listing priced exactly at it still matches."""
        def literal(value: str) -> str:
            return json.dumps(value, ensure_ascii=True)

        def amount(value: float) -> str:
            return repr(float(np.float32(value)) if float32_prices else float(value))

        clauses = []
        if self.category:
            clauses.append(f"category_path in [{', '.join(literal(v) for v in self.category)}]")
        if self.category_prefix:
            # The node, or a range of what lies below it, not LIKE: Milvus 2.3 reads "_" in a LIKE pattern as itself
            # and has no escape for it, Milvus Lite 3 (as newer servers) as a wildcard unless escaped, so no one
            # pattern matches a prefix with "_" on both (tried on both). Every path below the node starts with
            # "node > " and so sorts from it to "node >!" (the separator's last character incremented): strings
            # compare bytewise, and the pattern allows ASCII only.
            node = self.category_prefix
            below = node + CATEGORY_SEPARATOR
            upper = below[:-1] + chr(ord(below[-1]) + 1)
            clauses.append(f"(category_path == {literal(node)} or "
                           f"(category_path >= {literal(below)} and category_path < {literal(upper)}))")
        if self.shop_country:
            clauses.append(f"shop_country in [{', '.join(literal(v) for v in self.shop_country)}]")
        if self.price_min is not None or self.price_max is not None:
            # A listing without a price is indexed at -1 (serving.index): a price bound never matches it.
            clauses.append(f"price >= {amount(self.price_min or 0.0)}")
        if self.price_max is not None:
            clauses.append(f"price <= {amount(self.price_max)}")
        if self.currency:
            clauses.append(f"currency == {literal(self.currency)}")
        return " and ".join(clauses)
