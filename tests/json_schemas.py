"""JSON schemas that the constrained-decoding tests generate against, shared so that the grammar tests
(random logits) and the server tests (random weights) hold the same shapes."""

from __future__ import annotations

from typing import Any

# Nested objects, arrays, enums, numbers with bounds, required and optional fields, nullable. Strings
# are bounded and every object closed (additionalProperties: false): a free-form string or random
# extra keys may run out of max_tokens.
SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "order": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"enum": ["A1", "B2", "C3"]},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                    },
                    "required": ["sku", "qty"],
                    "additionalProperties": False,
                },
            },
            "express": {"type": "boolean"},
        },
        "required": ["items", "express"],
        "additionalProperties": False,
    },
    "reading": {
        "type": "object",
        "properties": {
            "celsius": {"type": "number", "minimum": -50, "maximum": 60},
            "humidity": {"type": "number", "minimum": 0, "maximum": 1},
            "unit": {"enum": ["metric", "imperial"]},
        },
        "required": ["celsius", "humidity", "unit"],
        "additionalProperties": False,
    },
    "account": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 1000},
                    "roles": {"type": "array", "items": {"enum": ["admin", "dev", "ops"]}, "maxItems": 3},
                },
                "required": ["id", "roles"],
                "additionalProperties": False,
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
        "additionalProperties": False,
    },
    "review": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 20},
            "rating": {"type": "integer", "minimum": 1, "maximum": 5},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
            "note": {"type": ["string", "null"], "maxLength": 10},
        },
        "required": ["rating", "title"],
        "additionalProperties": False,
    },
}
