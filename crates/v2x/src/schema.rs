//! A checker for the part of JSON Schema (OpenAPI 3.0 flavour) the MEC 030 document uses:
//! `$ref` to `#/components/schemas/…`, `type`, `properties`, `required`, `items`,
//! `minItems`, `enum`, `oneOf`. Unknown keywords (formats, `x-etsi-…`, descriptions) are
//! ignored, as a validator must. Ours rather than a JSON-schema crate: the general ones
//! pull in a regex engine, an HTTP client for remote `$ref`s and hundreds of kB of code for
//! drafts the document does not use, and none reads OpenAPI 3.0's dialect (`nullable`, a
//! `required` list inside an array schema) without adaptation anyway.

use serde_json::Value;

/// Checks `v` against the schema named `name` in `doc`'s `components.schemas`; returns
/// every violation as `path: what` (empty when valid).
pub fn check(doc: &Value, name: &str, v: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    match doc["components"]["schemas"].get(name) {
        Some(s) => walk(doc, s, v, "$", &mut errs, 0),
        None => errs.push(format!("no schema {name} in the document")),
    }
    errs
}

fn resolve<'a>(doc: &'a Value, s: &'a Value) -> Option<&'a Value> {
    match s.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r.strip_prefix("#/components/schemas/")?;
            doc["components"]["schemas"].get(name)
        }
        None => Some(s),
    }
}

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        _ => true,
    }
}

fn walk(doc: &Value, s: &Value, v: &Value, path: &str, errs: &mut Vec<String>, depth: u32) {
    if depth > 64 {
        errs.push(format!("{path}: schema nesting too deep"));
        return;
    }
    let Some(s) = resolve(doc, s) else {
        errs.push(format!("{path}: unresolvable $ref {}", s["$ref"]));
        return;
    };
    if let Some(one) = s.get("oneOf").and_then(Value::as_array) {
        let ok = one
            .iter()
            .filter(|alt| {
                let mut e = Vec::new();
                walk(doc, alt, v, path, &mut e, depth + 1);
                e.is_empty()
            })
            .count();
        if ok != 1 {
            errs.push(format!(
                "{path}: matches {ok} of the oneOf alternatives, not exactly 1"
            ));
        }
        return;
    }
    if let Some(t) = s.get("type").and_then(Value::as_str) {
        if !type_ok(t, v) {
            errs.push(format!("{path}: expected {t}, got {v}"));
            return;
        }
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            errs.push(format!(
                "{path}: {v} is not one of {}",
                Value::Array(e.clone())
            ));
        }
    }
    if let Some(o) = v.as_object() {
        for r in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(k) = r.as_str() {
                if !o.contains_key(k) {
                    errs.push(format!("{path}: missing required {k}"));
                }
            }
        }
        if let Some(props) = s.get("properties").and_then(Value::as_object) {
            for (k, pv) in o {
                if let Some(ps) = props.get(k) {
                    walk(doc, ps, pv, &format!("{path}.{k}"), errs, depth + 1);
                }
            }
        }
    }
    if let Some(a) = v.as_array() {
        if let Some(min) = s.get("minItems").and_then(Value::as_u64) {
            if (a.len() as u64) < min {
                errs.push(format!("{path}: {} items, fewer than {min}", a.len()));
            }
        }
        if let Some(items) = s.get("items") {
            for (i, x) in a.iter().enumerate() {
                walk(doc, items, x, &format!("{path}[{i}]"), errs, depth + 1);
            }
        }
    }
}

/// Merges the `components.schemas` and `paths` of `extra` into `doc` (extra wins).
pub fn merge(doc: &mut Value, extra: &Value) {
    for section in ["schemas"] {
        if let (Some(d), Some(e)) = (
            doc["components"][section].as_object_mut(),
            extra["components"][section].as_object(),
        ) {
            for (k, v) in e {
                d.insert(k.clone(), v.clone());
            }
        }
    }
    if let (Some(d), Some(e)) = (doc["paths"].as_object_mut(), extra["paths"].as_object()) {
        for (k, v) in e {
            d.insert(k.clone(), v.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_what_is_wrong() {
        let doc = json!({"components": {"schemas": {
            "P": {"type": "object", "required": ["mcc"], "properties": {"mcc": {"type": "string"}}},
            "L": {"type": "object", "properties": {"p": {"$ref": "#/components/schemas/P"},
                  "t": {"type": "integer", "enum": [1, 2]}, "a": {"type": "array", "minItems": 1, "items": {"type": "string"}}}}
        }}});
        assert!(check(&doc, "L", &json!({"p": {"mcc": "001"}, "t": 2, "a": ["x"]})).is_empty());
        let e = check(&doc, "L", &json!({"p": {}, "t": 3, "a": [1]}));
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(!check(&doc, "L", &json!({"a": []})).is_empty());
        assert!(!check(&doc, "Nope", &json!({})).is_empty());
    }
}
