"""The 30 JSON schemas the constrained-decoding tests decode (issue 37): nested objects, arrays with min/max items,
enums, bounded numbers, anyOf, $ref and string patterns. Each comes with a short request a chat model can follow.

Every object closes (additionalProperties false, as OpenAI's strict mode requires) and recursion is bounded: an
open object lets a small model add keys of its own until max_tokens (SmolLM2 did, on 3 of 30), which is the schema
allowing it, not the constraint failing."""

from __future__ import annotations

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0,
                                                                                "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}

SCHEMAS: list[tuple[str, dict]] = [
    ("a person", PERSON),
    ("a yes/no answer", {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"]}),
    ("a colour", {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}},
                  "required": ["colour"]}),
    ("a city and its country", {"type": "object", "properties": {"city": {"type": "string"},
                                                                 "country": {"type": "string"}},
                                "required": ["city", "country"], "additionalProperties": False}),
    ("a score between 1 and 10", {"type": "object", "properties": {"score": {"type": "integer", "minimum": 1,
                                                                             "maximum": 10}},
                                  "required": ["score"]}),
    ("a temperature in Celsius", {"type": "object", "properties": {"celsius": {"type": "number", "minimum": -50,
                                                                               "maximum": 60}},
                                  "required": ["celsius"]}),
    ("three fruits", {"type": "object", "properties": {"fruits": {"type": "array", "items": {"type": "string"},
                                                                  "minItems": 3, "maxItems": 3}},
                      "required": ["fruits"]}),
    ("one to four tags", {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string",
                                                                                              "maxLength": 12},
                                                                    "minItems": 1, "maxItems": 4}},
                          "required": ["tags"]}),
    ("a list of numbers", {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                           "minItems": 2, "maxItems": 5}),
    ("a book with an author", {"type": "object", "properties": {
        "title": {"type": "string"},
        "author": {"type": "object", "properties": {"first": {"type": "string"}, "last": {"type": "string"}},
                   "required": ["first", "last"], "additionalProperties": False}},
        "required": ["title", "author"], "additionalProperties": False}),
    ("a team of people", {"type": "object", "properties": {"team": {"type": "array", "items": {"$ref": "#/$defs/p"},
                                                                    "minItems": 1, "maxItems": 2}},
                          "required": ["team"], "$defs": {"p": PERSON}}),
    ("an id or a name", {"type": "object", "properties": {"key": {"anyOf": [{"type": "integer"},
                                                                            {"type": "string", "maxLength": 20}]}},
                         "required": ["key"]}),
    ("a date", {"type": "object", "properties": {"date": {"type": "string",
                                                          "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
                "required": ["date"]}),
    ("a phone number", {"type": "object", "properties": {"phone": {"type": "string",
                                                                   "pattern": "^\\+?[0-9]{7,12}$"}},
                        "required": ["phone"]}),
    ("a sentiment label", {"type": "object", "properties": {
        "label": {"enum": ["positive", "negative", "neutral"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["label", "confidence"], "additionalProperties": False}),
    ("a point", {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                 "required": ["x", "y"], "additionalProperties": False}),
    ("a matrix", {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                        "maximum": 9},
                                             "minItems": 2, "maxItems": 2}, "minItems": 2, "maxItems": 2}),
    ("an address", {"$ref": "#/$defs/address", "$defs": {"address": {
        "type": "object", "properties": {"street": {"type": "string"}, "zip": {"type": "string",
                                                                              "pattern": "^[0-9]{5}$"}},
        "required": ["street", "zip"], "additionalProperties": False}}}),
    ("a shape", {"type": "object", "properties": {"shape": {"anyOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number", "minimum": 0}},
         "required": ["kind", "r"], "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1}},
         "required": ["kind", "side"], "additionalProperties": False}]}}, "required": ["shape"]}),
    ("a product", {"type": "object", "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 30},
        "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000},
        "in_stock": {"type": "boolean"}}, "required": ["name", "price", "in_stock"], "additionalProperties": False}),
    ("a short word", {"type": "string", "pattern": "^[a-z]{2,8}$"}),
    ("a number from 0 to 100", {"type": "integer", "minimum": 0, "maximum": 100}),
    ("a weekday", {"enum": ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]}),
    ("a tree node", {"$ref": "#/$defs/node", "$defs": {
        "node": {"type": "object", "properties": {"value": {"type": "integer", "minimum": 0, "maximum": 9},
                                                  "children": {"type": "array", "items": {"$ref": "#/$defs/leaf"},
                                                               "maxItems": 2}},
                 "required": ["value", "children"], "additionalProperties": False},
        "leaf": {"type": "object", "properties": {"value": {"type": "integer", "minimum": 0, "maximum": 9}},
                 "required": ["value"], "additionalProperties": False}}}),
    ("an optional nickname", {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                               "nickname": {"anyOf": [{"type": "string",
                                                                                       "maxLength": 10},
                                                                                      {"type": "null"}]}},
                              "required": ["name", "nickname"], "additionalProperties": False}),
    ("an email", {"type": "object", "properties": {"email": {"type": "string",
                                                             "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"}},
                  "required": ["email"]}),
    ("a rating with a reason", {"type": "object", "properties": {
        "stars": {"type": "integer", "minimum": 1, "maximum": 5}, "reason": {"type": "string", "maxLength": 40}},
        "required": ["stars", "reason"], "additionalProperties": False}),
    ("an event", {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 30},
        "when": {"type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23},
                                                  "minute": {"type": "integer", "minimum": 0, "maximum": 59}},
                 "required": ["hour", "minute"], "additionalProperties": False},
        "attendees": {"type": "array", "items": {"type": "string", "maxLength": 15}, "maxItems": 3}},
        "required": ["name", "when", "attendees"], "additionalProperties": False}),
    ("a pair of flags", {"type": "array", "prefixItems": [{"type": "boolean"}, {"type": "boolean"}],
                         "items": False, "minItems": 2}),
    ("an HTTP status", {"type": "object", "properties": {"code": {"enum": [200, 301, 404, 500]},
                                                         "ok": {"type": "boolean"}},
                        "required": ["code", "ok"], "additionalProperties": False}),
]


def closed(node):
    """The schema with additionalProperties false on every object that does not say (a copy)."""
    if isinstance(node, dict):
        out = {k: closed(v) for k, v in node.items()}
        if out.get("type") == "object" and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [closed(v) for v in node]
    return node


SCHEMAS = [(name, closed(schema)) for name, schema in SCHEMAS]
