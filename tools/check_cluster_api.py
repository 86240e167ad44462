#!/usr/bin/env python3
"""Checks docs/cluster-api.yaml and real answers against it.

    python3 tools/check_cluster_api.py SPEC [PATH=FILE ...]

SPEC must be a valid OpenAPI 3.0 document (openapi-spec-validator), and each FILE,
the JSON body a GET of PATH answered with 200, must match that response's schema
(jsonschema; the document's schemas are JSON Schema apart from `example`, which
validation ignores). Exit 1, with each mismatch, if anything fails."""
import json
import sys

import yaml
from jsonschema import Draft7Validator
from openapi_spec_validator import validate


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    spec = yaml.safe_load(open(sys.argv[1]))
    validate(spec)
    failures = 0
    for argument in sys.argv[2:]:
        path, file = argument.split("=", 1)
        operation = spec["paths"][path]["get"]
        schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
        # References resolve against the whole document.
        validator = Draft7Validator(dict(schema, components=spec["components"]))
        body = json.load(open(file))
        for error in validator.iter_errors(body):
            failures += 1
            print(f"{path}: {'/'.join(map(str, error.absolute_path))}: {error.message}", file=sys.stderr)
    print(f"{sys.argv[1]}: valid; {len(sys.argv) - 2} answers checked, {failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
