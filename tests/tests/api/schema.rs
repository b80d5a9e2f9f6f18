//! The OpenAPI 3.1 document of `forkd serve` and the check of live
//! responses against it. Its schemas are JSON Schema 2020-12, validated by
//! the `jsonschema` crate with the whole document registered as one
//! resource, so `$ref`s into `#/components/...` resolve.

use jsonschema::{Draft, Registry};
use serde_json::{json, Value};
use std::sync::OnceLock;

/// The document's URI in the registry (it has no `$id`).
const BASE: &str = "urn:forkd:openapi";

pub struct Spec {
    doc: Value,
    registry: Registry<'static>,
}

pub fn spec() -> &'static Spec {
    static SPEC: OnceLock<Spec> = OnceLock::new();
    SPEC.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../forkd/api/openapi.json");
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        Spec::new(serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}")))
    })
}

/// One JSON pointer token (RFC 6901).
fn token(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

impl Spec {
    pub fn new(doc: Value) -> Spec {
        let registry = Registry::new()
            .draft(Draft::Draft202012)
            .add(BASE, doc.clone())
            .and_then(|r| r.prepare())
            .unwrap_or_else(|e| panic!("OpenAPI document as a schema resource: {e}"));
        Spec { doc, registry }
    }

    pub fn doc(&self) -> &Value {
        &self.doc
    }

    /// Validates `v` against the schema at `pointer` (a JSON pointer into
    /// the document).
    pub fn validate(&self, pointer: &str, v: &Value) -> Result<(), String> {
        // As a URI fragment: path templates have braces.
        let fragment = pointer
            .replace('%', "%25")
            .replace('{', "%7B")
            .replace('}', "%7D");
        let validator = jsonschema::draft202012::options()
            .with_registry(&self.registry)
            .should_validate_formats(true)
            .build(&json!({ "$ref": format!("{BASE}#{fragment}") }))
            .map_err(|e| format!("schema {pointer}: {e}"))?;
        validator
            .validate(v)
            .map_err(|e| format!("{}: {e}", e.instance_path()))
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
        self.check(method, path, status, body, false)
    }

    /// Checks a live text/plain response (e.g. `/metrics`): its status and
    /// content type must be documented.
    pub fn check_text_response(&self, method: &str, path: &str, status: u16) -> Result<(), String> {
        self.check(method, path, status, None, true)
    }

    fn check(
        &self,
        method: &str,
        path: &str,
        status: u16,
        body: Option<&Value>,
        text: bool,
    ) -> Result<(), String> {
        let m = method.to_ascii_lowercase();
        let op = self
            .template(path)
            .filter(|t| self.doc["paths"][t][&m].is_object());
        let (template, mut pointer) = match op {
            Some(t) => {
                let responses = &self.doc["paths"][t][&m]["responses"];
                let key = [status.to_string(), "default".into()]
                    .into_iter()
                    .find(|k| responses.get(k).is_some())
                    .ok_or_else(|| format!("{method} {t}: status {status} not documented"))?;
                (t, format!("/paths/{}/{m}/responses/{key}", token(t)))
            }
            // No such route (404) or method (405): the generic error.
            None if status == 404 || status == 405 => (path, "/components/responses/Error".into()),
            None => {
                return Err(format!(
                    "{method} {path}: not in the spec (status {status})"
                ))
            }
        };
        // A response object may be a `$ref` to `#/components/responses/...`.
        if let Some(r) = self.doc.pointer(&pointer).and_then(|r| r["$ref"].as_str()) {
            pointer = r.strip_prefix('#').unwrap_or(r).to_owned();
        }
        let at = format!("{method} {template} {status}");
        if text {
            let doc = format!("{pointer}/content/text~1plain");
            return match self.doc.pointer(&doc) {
                Some(_) => Ok(()),
                None => Err(format!("{at}: a text/plain body is not documented")),
            };
        }
        let schema = format!("{pointer}/content/application~1json/schema");
        match (self.doc.pointer(&schema), body) {
            (Some(_), Some(b)) => self.validate(&schema, b).map_err(|e| format!("{at}: {e}")),
            (Some(_), None) => Err(format!("{at}: body missing")),
            (None, Some(b)) => Err(format!("{at}: no body documented, got {b}")),
            (None, None) => Ok(()),
        }
    }
}

#[cfg(test)]
mod validator_tests {
    use super::*;

    fn check(schema: &str, v: Value) -> Result<(), String> {
        spec().validate(&format!("/components/schemas/{schema}"), &v)
    }

    #[test]
    fn accepts_what_the_server_sends() {
        check("Created", json!({"id": "vm-1", "state": "running"})).unwrap();
        check("Error", json!({"error": "no VM with id 'vm-9'"})).unwrap();
        let clone = json!({"clone_id": 1, "state": "exited", "exit": {"code": 0, "reason": "ok"},
            "ip": "10.200.0.1", "mac": "02:fd:00:00:00:01",
            "generation": "0123456789abcdef0123456789abcdef"});
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

    /// Every component schema is valid JSON Schema 2020-12, and every
    /// object schema with properties allows no others.
    #[test]
    fn schemas_are_valid_and_strict() {
        let schemas = spec().doc()["components"]["schemas"].as_object().unwrap();
        for (name, s) in schemas {
            if let Err(e) = jsonschema::draft202012::meta::validate(s) {
                panic!("schema {name} is not JSON Schema 2020-12: {e}");
            }
            if s.get("properties").is_some() {
                let extra = s.get("additionalProperties");
                assert_eq!(extra, Some(&json!(false)), "{name} allows extra properties");
            }
        }
    }

    #[test]
    fn undocumented_statuses_are_errors() {
        let s = spec();
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
        let forked = json!({"family": 1, "clones": [1, 2]});
        s.check_response("POST", "/v1/vms/vm-1/fork", 200, Some(&forked))
            .expect("a Forked body");
        let bad = json!({"family": 0, "clones": []});
        s.check_response("POST", "/v1/vms/vm-1/fork", 200, Some(&bad))
            .expect_err("family 0 is no Forked body");
        s.check_response("GET", "/v1/openapi.json", 200, Some(s.doc()))
            .expect("the document itself");
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
