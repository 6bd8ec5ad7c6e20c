//! Making the OpenAPI document say exactly what the handlers do, where poem-openapi's
//! derive cannot: an optional property accepts and may answer `null` (poem-openapi reads
//! `null` as absent and writes `None` as `null`, but does not say so), and the checks a
//! handler makes itself, so that it can answer 422 naming the field rather than poem's
//! 400, still appear as constraints for generated clients and fuzzers.

use serde_json::{Map, Value};

/// A constraint a handler enforces on one property of a request schema.
#[derive(Debug, Clone, Copy)]
pub struct Constraint {
    /// The schema (the Rust type's name, as the document names it).
    pub schema: &'static str,
    /// The property.
    pub property: &'static str,
    /// Fewest characters.
    pub min_length: Option<u32>,
    /// Most characters.
    pub max_length: Option<u32>,
}

impl Constraint {
    /// A string of `min..=max` characters.
    pub const fn length(schema: &'static str, property: &'static str, min: u32, max: u32) -> Self {
        Self {
            schema,
            property,
            min_length: Some(min),
            max_length: Some(max),
        }
    }
}

/// The document `spec` (JSON) with every optional property nullable, `constraints`
/// applied, and links from each creation to the operations on what it created. Panics when a constraint names a schema or property the document does not
/// have: a rename must not silently drop it (the API's tests build the document).
pub fn refine(spec: &str, constraints: &[Constraint]) -> String {
    let mut doc: Value = serde_json::from_str(spec).expect("poem-openapi writes JSON");
    let schemas = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut);
    if let Some(schemas) = schemas {
        schemas.values_mut().for_each(optional_is_nullable);
        for c in constraints {
            let property = schemas
                .get_mut(c.schema)
                .and_then(|s| s.pointer_mut(&format!("/properties/{}", c.property)))
                .and_then(Value::as_object_mut)
                .unwrap_or_else(|| panic!("no property {}.{} to constrain", c.schema, c.property));
            if let Some(n) = c.min_length {
                property.insert("minLength".into(), n.into());
            }
            if let Some(n) = c.max_length {
                property.insert("maxLength".into(), n.into());
            }
        }
    }
    link_created_resources(&mut doc);
    serde_json::to_string(&doc).expect("serializable")
}

/// OpenAPI links from every `POST /x` answering 201 to the operations of `/x/{id}` and
/// below it (`/x/{id}/...`) with the created body's `id` as their `id`: how clients (and
/// stateful fuzzers) know that a created resource is read, changed and deleted there.
fn link_created_resources(doc: &mut Value) {
    let Some(paths) = doc.get("paths").and_then(Value::as_object) else {
        return;
    };
    let mut links: Vec<(String, String)> = Vec::new();
    for (path, item) in paths {
        if item.pointer("/post/responses/201").is_none() {
            continue;
        }
        let below = format!("{path}/{{id}}");
        for (other, operations) in paths {
            if other != &below && !other.starts_with(&format!("{below}/")) {
                continue;
            }
            let Some(operations) = operations.as_object() else {
                continue;
            };
            for operation in operations.values() {
                if let Some(id) = operation.get("operationId").and_then(Value::as_str) {
                    links.push((path.clone(), id.to_owned()));
                }
            }
        }
    }
    for (path, target) in links {
        let Some(response) = doc
            .pointer_mut(&format!(
                "/paths/{}/post/responses/201",
                path.replace('~', "~0").replace('/', "~1")
            ))
            .and_then(Value::as_object_mut)
        else {
            continue;
        };
        let links = response
            .entry("links")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(links) = links.as_object_mut() {
            links.insert(
                target.clone(),
                serde_json::json!({
                    "operationId": target,
                    "parameters": {"id": "$response.body#/id"},
                }),
            );
        }
    }
}

/// Marks every property an object schema does not require as nullable (a `$ref` through
/// `allOf`, where OpenAPI 3.0 ignores siblings of `$ref`).
fn optional_is_nullable(schema: &mut Value) {
    let required: Vec<String> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| {
            r.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
        return;
    };
    for (name, property) in properties.iter_mut() {
        if required.contains(name) {
            continue;
        }
        let Some(p) = property.as_object_mut() else {
            continue;
        };
        if let Some(reference) = p.remove("$ref") {
            let mut wrapped = Map::new();
            wrapped.insert(
                "allOf".into(),
                Value::Array(vec![[("$ref".to_owned(), reference)].into_iter().collect()]),
            );
            for (k, v) in std::mem::take(p) {
                wrapped.insert(k, v);
            }
            *p = wrapped;
        }
        p.insert("nullable".into(), Value::Bool(true));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn optional_properties_become_nullable_and_constraints_apply() {
        let spec = json!({"components": {"schemas": {"Thing": {
            "type": "object",
            "required": ["id", "name"],
            "properties": {
                "id": {"type": "string"},
                "name": {"type": "string"},
                "note": {"type": "string"},
                "owner": {"$ref": "#/components/schemas/Owner"},
            },
        }}}});
        let out: Value = serde_json::from_str(&refine(
            &spec.to_string(),
            &[Constraint::length("Thing", "name", 1, 200)],
        ))
        .unwrap();
        let props = &out["components"]["schemas"]["Thing"]["properties"];
        assert_eq!(props["id"], json!({"type": "string"}));
        assert_eq!(
            props["name"],
            json!({"type": "string", "minLength": 1, "maxLength": 200})
        );
        assert_eq!(props["note"], json!({"type": "string", "nullable": true}));
        assert_eq!(
            props["owner"],
            json!({"allOf": [{"$ref": "#/components/schemas/Owner"}], "nullable": true})
        );
    }

    #[test]
    fn a_creation_links_to_the_operations_on_what_it_created() {
        let spec = json!({
            "paths": {
                "/things": {
                    "post": {"operationId": "createThing", "responses": {"201": {}}},
                    "get": {"operationId": "listThings", "responses": {"200": {}}},
                },
                "/things/{id}": {
                    "get": {"operationId": "getThing", "responses": {}},
                    "delete": {"operationId": "deleteThing", "responses": {}},
                },
                "/things/{id}/parts": {"get": {"operationId": "thingParts", "responses": {}}},
                "/thingsmore/{id}": {"get": {"operationId": "other", "responses": {}}},
            }
        });
        let doc: Value = serde_json::from_str(&refine(&spec.to_string(), &[])).unwrap();
        let links = doc["paths"]["/things"]["post"]["responses"]["201"]["links"]
            .as_object()
            .unwrap();
        let mut names: Vec<&String> = links.keys().collect();
        names.sort();
        assert_eq!(names, ["deleteThing", "getThing", "thingParts"]);
        assert_eq!(
            links["getThing"],
            json!({"operationId": "getThing", "parameters": {"id": "$response.body#/id"}})
        );
        assert!(doc["paths"]["/things"]["get"]["responses"]["200"]
            .get("links")
            .is_none());
    }

    #[test]
    #[should_panic(expected = "no property Thing.gone")]
    fn a_constraint_on_a_missing_property_is_refused() {
        let spec = json!({"components": {"schemas": {"Thing": {"properties": {}}}}});
        refine(
            &spec.to_string(),
            &[Constraint::length("Thing", "gone", 1, 2)],
        );
    }
}
