"""Calculated query cost, checked on the parsed document before authentication and execution
(the idea of GitHub's node limit and Shopify's calculated query cost).

Every field costs 1. A field that returns a list of objects multiplies the cost of its
selection by the list's bound: its `limit` argument, else the page size a resolver allows,
else the documented bound of an unbounded list (see BOUNDS and docs/security.md). Lists of
scalars (`missingSliceIndexes`) count as one field: their items have no resolvers.
Fragments count once per spread; each fragment's cost is computed once per document, so a
document whose spreads double at every level costs a linear walk, not an exponential one.
Sums and products saturate, and a selection stops being counted once it is over the limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLEnumType,
    GraphQLField,
    GraphQLInputObjectType,
    GraphQLInterfaceType,
    GraphQLList,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLSchema,
    InlineFragmentNode,
    IntValueNode,
    OperationDefinitionNode,
    SelectionSetNode,
    ValueNode,
    VariableNode,
    get_named_type,
    introspection_types,
)
from graphql.type.introspection import SchemaMetaFieldDef, TypeMetaFieldDef

from app.annotations import ANNOTATIONS_PAGE_MAX
from app.audit import AUDIT_PAGE_MAX
from app.errors import BadUserInput
from app.group_validation import MAX_STORED_PROBLEMS

# Assumed sizes of the lists that have no `limit` (they are estimates, not caps: a larger
# annotation still executes; it is simply counted at this size).
MASK_GROUPS_PER_ANNOTATION = 10  # one group per model run or drawing
MASKS_PER_GROUP = 1000  # a CT/MR series of up to ~1000 slices, one label
SIGNED_HEADERS = 4  # Content-Type, Content-MD5 (and a spare for other backends)
USAGE_ROWS = 1000  # storageUsage: models, modalities or days of a few years; rows are scalars
# Counting stops here: every value the analysis handles stays a small integer.
CEILING = 2**53


class QueryTooExpensive(BadUserInput):
    pass


def list_bounds(max_slices_per_call: int) -> dict[tuple[str, str], int]:
    """The bound of every list-of-objects field of the schema, used when no `limit` is given."""
    return {
        # The resolvers' own maximum page sizes, for a `limit` that is not an integer.
        ("Query", "annotations"): ANNOTATIONS_PAGE_MAX,
        ("Query", "auditEvents"): AUDIT_PAGE_MAX,
        ("Annotation", "maskGroups"): MASK_GROUPS_PER_ANNOTATION,
        ("MaskGroup", "masks"): MASKS_PER_GROUP,
        ("Mutation", "requestMaskUploadUrls"): max_slices_per_call,
        ("CompleteMaskUploadPayload", "masks"): max_slices_per_call,
        ("MaskUploadTarget", "headers"): SIGNED_HEADERS,
        ("SignedUrl", "headers"): SIGNED_HEADERS,
        ("Query", "storageUsage"): USAGE_ROWS,
        # Reports keep at most this many problems.
        ("ValidationReport", "problems"): MAX_STORED_PROBLEMS,
    }


def _introspection_bounds(schema: GraphQLSchema) -> dict[tuple[str, str], int]:
    # The schema is ours and fixed. A type's lists count at their average size over the
    # schema, so that `__schema { types { fields { args } } }` costs about what it returns
    # (the maximum would count every type as the largest: GraphiQL's query 20 times over).
    types = list(schema.type_map.values())
    objects = [item for item in types if isinstance(item, GraphQLObjectType | GraphQLInterfaceType)]
    fields = [field for item in objects for field in item.fields.values()]
    input_fields = sum(
        len(item.fields) for item in types if isinstance(item, GraphQLInputObjectType)
    )
    enum_values = sum(len(item.values) for item in types if isinstance(item, GraphQLEnumType))
    directive_args = sum(len(directive.args) for directive in schema.directives)

    def average(total: int, count: int) -> int:
        return max(-(-total // max(count, 1)), 1)

    return {
        ("__Schema", "types"): len(types),
        ("__Schema", "directives"): len(schema.directives),
        ("__Type", "fields"): average(len(fields), len(types)),
        ("__Type", "inputFields"): average(input_fields, len(types)),
        ("__Type", "enumValues"): average(enum_values, len(types)),
        ("__Type", "interfaces"): 1,
        ("__Type", "possibleTypes"): 1,
        ("__Field", "args"): average(sum(len(field.args) for field in fields), len(fields)),
        ("__Directive", "args"): average(directive_args, len(schema.directives)),
    }


def _is_object_list(field: GraphQLField) -> bool:
    field_type = field.type
    if isinstance(field_type, GraphQLNonNull):
        field_type = field_type.of_type
    if not isinstance(field_type, GraphQLList):
        return False
    return isinstance(get_named_type(field_type), GraphQLObjectType | GraphQLInterfaceType)


class QueryCost:
    """The cost model of one schema; `check` runs per request."""

    def __init__(self, schema: GraphQLSchema, *, max_slices_per_call: int) -> None:
        self.schema = schema
        self.bounds = {**list_bounds(max_slices_per_call), **_introspection_bounds(schema)}
        unbounded = [
            f"{type_name}.{field_name}"
            for type_name, graphql_type in schema.type_map.items()
            if isinstance(graphql_type, GraphQLObjectType) and type_name not in introspection_types
            for field_name, field in graphql_type.fields.items()
            if _is_object_list(field) and (type_name, field_name) not in self.bounds
        ]
        if unbounded:
            raise ValueError(f"list fields without a cost bound: {', '.join(unbounded)}")

    def check(
        self,
        document: DocumentNode,
        operation: OperationDefinitionNode,
        variables: Mapping[str, Any] | None,
        *,
        limit: int,
    ) -> int:
        """The operation's cost, refused above `limit` (counting stops there)."""
        walk = _Walk(self, document, operation, variables or {}, limit)
        root = self.schema.get_root_type(operation.operation)
        cost = walk.selection_cost(operation.selection_set, root)
        if cost > limit:
            raise QueryTooExpensive(
                f"query cost is at least {cost}, above the limit of {limit} (MAX_QUERY_COST): "
                "ask for "
                "fewer fields or pass smaller `limit` or slice ranges to lists",
                cost=cost,
                maxCost=limit,
            )
        return cost


class _Walk:
    def __init__(
        self,
        model: QueryCost,
        document: DocumentNode,
        operation: OperationDefinitionNode,
        variables: Mapping[str, Any],
        limit: int,
    ) -> None:
        self.model = model
        self.limit = limit
        self.variables = variables
        self.defaults = {
            definition.variable.name.value: definition.default_value
            for definition in operation.variable_definitions or ()
        }
        self.fragments = {
            definition.name.value: definition
            for definition in document.definitions
            if isinstance(definition, FragmentDefinitionNode)
        }
        self.fragment_costs: dict[str, int] = {}

    def selection_cost(self, selection_set: SelectionSetNode | None, parent: Any) -> int:
        if selection_set is None:
            return 0
        total = 0
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode):
                total += self.field_cost(selection, parent)
            elif isinstance(selection, InlineFragmentNode):
                condition = selection.type_condition
                target = self.model.schema.get_type(condition.name.value) if condition else parent
                total += self.selection_cost(selection.selection_set, target)
            elif isinstance(selection, FragmentSpreadNode):
                total += self.fragment_cost(selection.name.value)
            if total > self.limit:
                break  # over the limit already: the rest cannot bring it back
        return min(total, CEILING)

    def fragment_cost(self, name: str) -> int:
        if name in self.fragment_costs:
            return self.fragment_costs[name]
        fragment = self.fragments.get(name)
        # A spread of a missing fragment, or one inside its own cycle, is a validation error
        # reported later; 0 while it is being counted keeps the walk finite.
        self.fragment_costs[name] = 0
        if fragment is None:
            return 0
        target = self.model.schema.get_type(fragment.type_condition.name.value)
        cost = self.selection_cost(fragment.selection_set, target)
        self.fragment_costs[name] = cost
        return cost

    def field_cost(self, node: FieldNode, parent: Any) -> int:
        if node.selection_set is None:
            return 1
        field = self._field(parent, node.name.value)
        if field is None:  # unknown field: validation refuses it; count what is below
            return min(1 + self.selection_cost(node.selection_set, None), CEILING)
        inner = self.selection_cost(node.selection_set, get_named_type(field.type))
        bound = 1
        if _is_object_list(field):
            bound = self._bound(parent.name, node, field)
        return min(1 + bound * inner, CEILING)

    def _field(self, parent: Any, name: str) -> GraphQLField | None:
        if name == "__schema":
            return SchemaMetaFieldDef
        if name == "__type":
            return TypeMetaFieldDef
        if not isinstance(parent, GraphQLObjectType | GraphQLInterfaceType):
            return None
        field: GraphQLField | None = parent.fields.get(name)
        return field

    def _bound(self, type_name: str, node: FieldNode, field: GraphQLField) -> int:
        arguments = {argument.name.value: argument.value for argument in node.arguments or ()}
        bound = self.model.bounds.get((type_name, node.name.value), CEILING)
        limit = self._int_argument(arguments, field, "limit")
        if limit is not None:
            bound = max(limit, 0)
        first = self._int_argument(arguments, field, "sliceIndexFrom")
        last = self._int_argument(arguments, field, "sliceIndexTo")
        if first is not None and last is not None:
            # One mask per slice index of the range (a second label doubles it: accepted).
            bound = min(bound, max(last - first + 1, 0))
        return min(bound, CEILING)

    def _int_argument(
        self, arguments: Mapping[str, ValueNode], field: GraphQLField, name: str
    ) -> int | None:
        definition = field.args.get(name)
        if definition is None:
            return None
        node = arguments.get(name)
        value: Any = definition.default_value
        if isinstance(node, VariableNode):
            variable = node.name.value
            if variable in self.variables:
                value = self.variables[variable]
            else:
                value = _int_literal(self.defaults.get(variable))
        elif node is not None:
            value = _int_literal(node)
        if isinstance(value, bool) or not isinstance(value, int):
            return None
        return max(min(value, CEILING), -CEILING)


def _int_literal(node: ValueNode | None) -> int | None:
    if not isinstance(node, IntValueNode):
        return None  # null, absent or another type (coercion refuses a wrong type)
    try:
        return int(node.value)
    except ValueError:  # more digits than Python converts: certainly too many
        return CEILING
