//! The published contract, checked on every successful answer the tests read: a 200,
//! 201 or 202 body must validate against a schema `/openapi.json` gives that path and status.

use std::sync::LazyLock;

use serde_json::{json, Map, Value};

/// The document, in JSON Schema terms (OpenAPI 3.0's `nullable` as a `null` type).
static SPEC: LazyLock<Value> = LazyLock::new(|| {
    let mut spec: Value = serde_json::from_str(&termopar_api::openapi_json()).unwrap();
    nullable_as_null_type(&mut spec);
    spec
});

fn nullable_as_null_type(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.values_mut().for_each(nullable_as_null_type);
            if map.remove("nullable") == Some(Value::Bool(true)) {
                let rest = std::mem::take(map);
                let mut any = Map::new();
                any.insert(
                    "anyOf".into(),
                    json!([Value::Object(rest), {"type": "null"}]),
                );
                *map = any;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(nullable_as_null_type),
        _ => {}
    }
}

/// Whether the document's path template `template` (`/clients/{id}`) matches `path`;
/// `Some(literal segments)` when it does, to prefer the most specific template.
fn matches(template: &str, path: &str) -> Option<usize> {
    let (t, p): (Vec<_>, Vec<_>) = (template.split('/').collect(), path.split('/').collect());
    if t.len() != p.len() {
        return None;
    }
    let mut literal = 0;
    for (t, p) in t.iter().zip(&p) {
        if t.starts_with('{') {
            continue;
        }
        if t != p {
            return None;
        }
        literal += 1;
    }
    Some(literal)
}

/// Panics unless `body` validates against a schema the document gives `path` and
/// `status` (under any method). Paths outside the document (`/health`, `/metrics`)
/// are not checked.
pub fn check(path: &str, status: u16, body: &Value) {
    let path = path.strip_prefix(termopar_api::API_PREFIX).unwrap_or(path);
    let path = path.trim_end_matches('/');
    let paths = SPEC["paths"].as_object().unwrap();
    let Some((template, operations)) = paths
        .iter()
        .filter_map(|(t, ops)| matches(t, path).map(|score| (score, t, ops)))
        .max_by_key(|(score, _, _)| *score)
        .map(|(_, t, ops)| (t, ops))
    else {
        return;
    };
    let schemas: Vec<&Value> = operations
        .as_object()
        .unwrap()
        .values()
        .filter_map(|op| op["responses"][status.to_string()]["content"].as_object())
        .flat_map(|content| content.values().map(|media| &media["schema"]))
        .collect();
    assert!(
        !schemas.is_empty(),
        "{path} answered {status}, which the document does not give {template}"
    );
    let mut errors = Vec::new();
    for schema in schemas {
        let root = json!({"allOf": [schema], "components": SPEC["components"]});
        let validator = jsonschema::validator_for(&root).expect("the document's schemas compile");
        match validator.validate(body) {
            Ok(()) => return,
            Err(e) => errors.push(format!("{e} at {}", e.instance_path)),
        }
    }
    panic!("{path} answered {status} with a body the document does not allow: {errors:?}\\n{body}");
}

#[test]
fn a_body_off_the_contract_is_caught() {
    let caught = std::panic::catch_unwind(|| {
        check("/api/v1/clients/x", 200, &json!({"id": 5}));
    });
    assert!(caught.is_err(), "a body without the required fields passes");
}
