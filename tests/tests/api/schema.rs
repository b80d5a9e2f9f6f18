//! The OpenAPI document of `forkd serve` and a small JSON Schema validator
//! for the subset it uses: `$ref` (local), `type`, `properties`,
//! `required`, `additionalProperties`, `items`, `enum`, `minimum`,
//! `maximum`, `minLength`, `maxLength`. Any other keyword in a schema is an
//! error, so the document never says something this validator skips.

use serde_json::Value;
use std::sync::OnceLock;

/// Annotations: carry no constraint.
const ANNOTATIONS: &[&str] = &["description", "default", "title", "examples"];

pub struct Spec {
    doc: Value,
}

pub fn spec() -> &'static Spec {
    static SPEC: OnceLock<Spec> = OnceLock::new();
    SPEC.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../forkd/api/openapi.json");
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        Spec::new(serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}")))
    })
}

fn type_ok(t: &str, v: &Value) -> Result<bool, String> {
    Ok(match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        other => return Err(format!("unknown type '{other}'")),
    })
}

impl Spec {
    pub fn new(doc: Value) -> Spec {
        Spec { doc }
    }

    pub fn doc(&self) -> &Value {
        &self.doc
    }

    /// Follows a local `$ref` (`#/a/b/c`).
    fn resolve<'a>(&'a self, v: &'a Value) -> Result<&'a Value, String> {
        let mut v = v;
        for _ in 0..16 {
            let Some(r) = v.get("$ref") else {
                return Ok(v);
            };
            let r = r.as_str().ok_or("$ref is not a string")?;
            let pointer = r
                .strip_prefix('#')
                .ok_or_else(|| format!("non-local $ref {r}"))?;
            v = self
                .doc
                .pointer(pointer)
                .ok_or_else(|| format!("dangling $ref {r}"))?;
        }
        Err("$ref chain too long".into())
    }

    /// The path template of the document matching a concrete path
    /// (`{name}` matches one segment).
    pub fn template(&self, path: &str) -> Option<&str> {
        let path = path.split('?').next().unwrap_or(path);
        let segs: Vec<&str> = path.split('/').collect();
        self.doc["paths"].as_object()?.keys().find_map(|t| {
            let tsegs: Vec<&str> = t.split('/').collect();
            let same = tsegs.len() == segs.len()
                && tsegs
                    .iter()
                    .zip(&segs)
                    .all(|(t, s)| t == s || (t.starts_with('{') && t.ends_with('}')));
            same.then_some(t.as_str())
        })
    }

    /// Checks a live response: the status must be documented for the
    /// operation (or a `default` must exist); a body must match the JSON
    /// schema, and a response without content must have an empty body.
    pub fn check_response(
        &self,
        method: &str,
        path: &str,
        status: u16,
        body: Option<&Value>,
    ) -> Result<(), String> {
        let op = self
            .template(path)
            .map(|t| (t, &self.doc["paths"][t][method.to_ascii_lowercase()]))
            .filter(|(_, op)| op.is_object());
        let (template, response) = match op {
            Some((t, op)) => {
                let responses = op
                    .get("responses")
                    .and_then(Value::as_object)
                    .ok_or_else(|| format!("{method} {t}: no responses"))?;
                let r = responses
                    .get(&status.to_string())
                    .or_else(|| responses.get("default"))
                    .ok_or_else(|| format!("{method} {t}: status {status} not documented"))?;
                (t, r)
            }
            // No such route (404) or method (405): the generic error.
            None if status == 404 || status == 405 => {
                (path, &self.doc["components"]["responses"]["Error"])
            }
            None => {
                return Err(format!(
                    "{method} {path}: not in the spec (status {status})"
                ))
            }
        };
        let response = self.resolve(response)?;
        let schema = response.pointer("/content/application~1json/schema");
        match (schema, body) {
            (Some(s), Some(b)) => self
                .validate(s, b, "$")
                .map_err(|e| format!("{method} {template} {status}: {e}")),
            (Some(_), None) => Err(format!("{method} {template} {status}: body missing")),
            (None, Some(b)) => Err(format!(
                "{method} {template} {status}: no body documented, got {b}"
            )),
            (None, None) => Ok(()),
        }
    }

    /// Validates `v` against `schema`; `at` names the place for errors.
    pub fn validate(&self, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
        let schema = self.resolve(schema)?;
        let obj = schema
            .as_object()
            .ok_or_else(|| format!("{at}: schema is not an object"))?;
        for (k, rule) in obj {
            match k.as_str() {
                "type" => {
                    let types: Vec<&str> = match rule {
                        Value::String(s) => vec![s.as_str()],
                        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                        _ => return Err(format!("{at}: bad 'type' in schema")),
                    };
                    let mut ok = false;
                    for t in &types {
                        ok |= type_ok(t, v)?;
                    }
                    if !ok {
                        return Err(format!("{at}: expected {types:?}, got {v}"));
                    }
                }
                "enum" => {
                    let allowed = rule.as_array().ok_or("bad 'enum' in schema")?;
                    if !allowed.contains(v) {
                        return Err(format!("{at}: {v} is not one of {rule}"));
                    }
                }
                "required" => {
                    let Some(o) = v.as_object() else { continue };
                    for name in rule.as_array().ok_or("bad 'required' in schema")? {
                        let name = name.as_str().ok_or("bad 'required' in schema")?;
                        if !o.contains_key(name) {
                            return Err(format!("{at}: required property '{name}' missing"));
                        }
                    }
                }
                "properties" => {
                    let Some(o) = v.as_object() else { continue };
                    let props = rule.as_object().ok_or("bad 'properties' in schema")?;
                    for (name, value) in o {
                        if let Some(s) = props.get(name) {
                            self.validate(s, value, &format!("{at}.{name}"))?;
                        }
                    }
                }
                "additionalProperties" => {
                    let Some(o) = v.as_object() else { continue };
                    let props = obj.get("properties").and_then(Value::as_object);
                    for (name, value) in o {
                        if props.is_some_and(|p| p.contains_key(name)) {
                            continue;
                        }
                        match rule {
                            Value::Bool(true) => {}
                            Value::Bool(false) => {
                                return Err(format!("{at}: unexpected property '{name}'"))
                            }
                            s => self.validate(s, value, &format!("{at}.{name}"))?,
                        }
                    }
                }
                "items" => {
                    let Some(a) = v.as_array() else { continue };
                    for (i, item) in a.iter().enumerate() {
                        self.validate(rule, item, &format!("{at}[{i}]"))?;
                    }
                }
                "minimum" | "maximum" => {
                    let (Some(n), Some(limit)) = (v.as_f64(), rule.as_f64()) else {
                        continue;
                    };
                    let bad = if k == "minimum" { n < limit } else { n > limit };
                    if bad {
                        return Err(format!("{at}: {v} violates {k} {rule}"));
                    }
                }
                "minLength" | "maxLength" => {
                    let (Some(s), Some(limit)) = (v.as_str(), rule.as_u64()) else {
                        continue;
                    };
                    let n = s.chars().count() as u64;
                    let bad = if k == "minLength" {
                        n < limit
                    } else {
                        n > limit
                    };
                    if bad {
                        return Err(format!("{at}: length {n} violates {k} {limit}"));
                    }
                }
                a if ANNOTATIONS.contains(&a) => {}
                other => return Err(format!("{at}: unsupported schema keyword '{other}'")),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod validator_tests {
    use super::*;
    use serde_json::json;

    fn check(schema: &str, v: Value) -> Result<(), String> {
        let s = spec();
        s.validate(
            &json!({ "$ref": format!("#/components/schemas/{schema}") }),
            &v,
            "$",
        )
    }

    #[test]
    fn accepts_what_the_server_sends() {
        check("Created", json!({"id": "vm-1", "state": "running"})).unwrap();
        check("Error", json!({"error": "no VM with id 'vm-9'"})).unwrap();
        let clone = json!({"clone_id": 1, "state": "exited", "exit": {"code": 0, "reason": "ok"},
            "ip": "10.200.0.1", "mac": "02:fd:00:01:00:01"});
        check("Clone", clone).unwrap();
    }

    #[test]
    fn rejects_mismatches() {
        let bad = [
            ("Created", json!({"id": "vm-1"})),                    // required
            ("Created", json!({"id": "vm-1", "state": "paused"})), // enum
            ("Created", json!({"id": 1, "state": "running"})),     // type
            ("Created", json!({"id": "vm-1", "state": "running", "x": 1})), // additional
            ("Error", json!("oops")),                              // type object
            ("Error", json!({"error": ""})),                       // minLength
            ("Forked", json!({"family": 1, "clones": [1, "2"]})),  // items
            ("Forked", json!({"family": 0, "clones": []})),        // minimum
            ("Console", json!({"lines": [], "dropped_lines": 1.5})), // integer
            ("Exit", json!({"code": 0, "reason": null})),          // null
        ];
        for (schema, v) in bad {
            assert!(check(schema, v.clone()).is_err(), "{schema} accepted {v}");
        }
    }

    #[test]
    fn unknown_keywords_and_undocumented_statuses_are_errors() {
        let s = spec();
        let e = s.validate(&json!({"type": "string", "pattern": "x"}), &json!("a"), "$");
        assert!(e.unwrap_err().contains("unsupported"));
        assert!(s
            .check_response("GET", "/v1/vms", 200, Some(&json!([])))
            .is_err());
        assert!(s.check_response("GET", "/v1/nope", 200, None).is_err());
        assert!(s.check_response("POST", "/v1/vms", 418, None).is_err());
        assert!(s
            .check_response("DELETE", "/v1/vms/vm-1", 204, Some(&json!({})))
            .is_err());
        assert!(s
            .check_response("DELETE", "/v1/vms/vm-1", 204, None)
            .is_ok());
        let missing = s.check_response("POST", "/v1/vms/vm-1/fork", 200, None);
        assert!(missing.is_err());
        // Undocumented codes fall back on `default`, which is an Error.
        let err = json!({"error": "method PUT is not allowed"});
        s.check_response("GET", "/v1/vms/vm-1", 405, Some(&err))
            .expect("default response");
        s.check_response("GET", "/v1/vms/vm-1", 405, Some(&json!({"e": 1})))
            .expect_err("not an Error");
        // Routes and methods the spec lacks: only 404 / 405 with an Error.
        s.check_response("PUT", "/v1/vms/vm-1", 405, Some(&err))
            .expect("405 for a method the path lacks");
        s.check_response("PUT", "/v1/vms/vm-1", 200, Some(&err))
            .expect_err("PUT is no operation of the path");
        s.check_response("GET", "/v1/nope", 404, Some(&json!({})))
            .expect_err("404 bodies are Errors");
    }
}
