"""Benchmark: what the server spends refusing (or admitting) a request before authentication:
parse with the token limit, depth and aliases, calculated cost, list lengths and text checks,
on adversarial documents at the token limit and on the largest legitimate batch.

    .venv/bin/python bench/admission.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from figures import Report, add_json_argument, machine
from graphql import get_introspection_query, get_operation_ast, parse

from app.config import Settings
from app.errors import BadUserInput
from app.graphql.cost import QueryCost
from app.graphql.limits import check_document
from app.graphql.schema import schema
from app.graphql.variables import check_list_lengths, check_text

SETTINGS = Settings(_env_file=None)


def doubling(levels: int, leaf: str) -> str:
    fragments = " ".join(
        f"fragment F{level} on Annotation {{ ...F{level + 1} ...F{level + 1} }}"
        for level in range(levels)
    )
    return f'{{ annotation(id: "1") {{ ...F0 }} }} {fragments} fragment F{levels} on Annotation {{ {leaf} }}'


def nested(levels: int) -> str:
    query = "id"
    for _ in range(levels):
        query = f"maskGroups {{ annotation {{ {query} }} }}"
    return f'{{ annotation(id: "1") {{ {query} }} }}'


SLICE = {
    "sliceIndex": 99_999,
    "labelName": "L" * 64,
    "contentType": "image/png",
    "fileSize": 67_108_864,
    "contentMd5": "4/ukI2WU1u7QvYjGm7ZmRA==",
}
URLS = """mutation($groupId: ID!, $slices: [SliceUploadInput!]!) {
  requestMaskUploadUrls(groupId: $groupId, slices: $slices) {
    sliceIndex labelName filePath url method headers { name value } expiresAt } }"""

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "2^90 fragment expansions": (doubling(90, "maskGroups { id }"), {}),
    "a chain of 1000 fragments (token limit)": (doubling(1000, "maskGroups { id }"), {}),
    "depth-14 maskGroups/annotation cycle": (nested(6), {}),
    "10,000 sibling fields (token limit)": ("{ " + "me { user } " * 4000 + "}", {}),
    "GraphiQL's introspection query": (get_introspection_query(descriptions=True), {}),
    "5000-slice requestMaskUploadUrls": (URLS, {"groupId": "1", "slices": [SLICE] * 5000}),
}


def admit(query: str, variables: dict[str, Any], cost: QueryCost) -> str:
    try:
        document = check_document(
            query,
            max_tokens=SETTINGS.max_query_tokens,
            max_depth=SETTINGS.max_query_depth,
            max_aliases=SETTINGS.max_query_aliases,
        )
        assert document is not None
        operation = get_operation_ast(document)
        assert operation is not None
        check_list_lengths(operation, variables, max_items=SETTINGS.max_slices_per_call)
        check_text(query, document, variables)
        value = cost.check(document, operation, variables, limit=SETTINGS.max_query_cost)
    except BadUserInput as error:
        return f"refused: {error.message[:60]}"
    return f"admitted, cost {value}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=20)
    add_json_argument(parser)
    args = parser.parse_args()
    report = Report("Admission before authentication: parse and checks (medians, in process)")
    report.context = {**machine(), "repeat": args.repeat}
    cost = QueryCost(schema._schema, max_slices_per_call=SETTINGS.max_slices_per_call)
    # graphql-core's parse is paid by every request anyway; the rest is the admission.
    print(f"{'case':42} {'parse':>8} {'checks':>8} {'max':>8}  verdict (medians, ms)")
    for name, (query, variables) in CASES.items():
        parses, totals = [], []
        for _ in range(args.repeat):
            started = time.perf_counter()
            parse(query, max_tokens=SETTINGS.max_query_tokens, no_location=True)
            parsed = time.perf_counter()
            verdict = admit(query, variables, cost)
            done = time.perf_counter()
            parses.append((parsed - started) * 1000)
            totals.append((done - parsed) * 1000)
        # check_document parses again (with the limits): its parse is taken out again here.
        checks = [total - parsed for total, parsed in zip(totals, parses, strict=True)]
        print(
            f"{name:42} {statistics.median(parses):8.2f} {statistics.median(checks):8.2f} "
            f"{max(checks):8.2f}  {verdict}"
        )
        report.add(f"{name}: parse", statistics.median(parses), "ms")
        report.add(f"{name}: checks", statistics.median(checks), "ms", note=verdict)
    report.write(args.json)


if __name__ == "__main__":
    main()
