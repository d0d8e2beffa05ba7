//! The OpenAPI 3.1 document of an API, generated from its route table and
//! the request and reply types' JSON schemas. The edge's and the origin's
//! documents are kept in `ferry/api/` (a test fails when they drift from
//! the code) and served at `GET /v1/openapi.json`.

use serde_json::{json, Map, Value};

use super::{ApiError, Route};

/// Statuses every route can answer.
const COMMON_ERRORS: [u16; 5] = [400, 401, 413, 415, 500];

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "The request is malformed (bad JSON, bad parameter)",
        401 => "Missing or wrong bearer token (TCP listener only)",
        404 => "No such volume or endpoint",
        405 => "The path exists with other methods",
        409 => "The request conflicts with the current state",
        413 => "The body is larger than the API accepts",
        415 => "The body is not application/json",
        500 => "An internal error",
        502 => "The origin refused or could not be reached",
        503 => "Not available yet (e.g. the cache opens with the first volume)",
        504 => "Timed out (e.g. a flush waiting for an unreachable origin)",
        _ => "See the error message",
    }
}

/// Builds the document.
pub fn document(title: &str, routes: &[Route]) -> Value {
    let mut settings = schemars::generate::SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    let mut gen = settings.into_generator();
    let error_schema = gen.subschema_for::<ApiError>();
    let mut paths = Map::new();
    for r in routes {
        let mut op = Map::new();
        op.insert("summary".into(), json!(r.summary));
        op.insert(
            "operationId".into(),
            json!(format!(
                "{}{}",
                r.method.to_lowercase(),
                r.path
                    .replace(['{', '}'], "")
                    .split('/')
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        let mut c = s.chars();
                        c.next()
                            .map(|f| f.to_uppercase().chain(c).collect::<String>())
                            .unwrap_or_default()
                    })
                    .collect::<String>()
                    .replace(['.', '_'], "")
            )),
        );
        let mut params: Vec<Value> = r
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|p| json!({"name": p, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        params.extend(r.query.iter().map(|(name, description)| {
            json!({"name": name, "in": "query", "required": false,
                   "description": description, "schema": {"type": "number"}})
        }));
        if !params.is_empty() {
            op.insert("parameters".into(), Value::Array(params));
        }
        if let Some(req) = r.request {
            let schema = req(&mut gen);
            op.insert(
                "requestBody".into(),
                json!({"required": true, "content": {"application/json": {"schema": schema}}}),
            );
        }
        let mut responses = Map::new();
        let (status, body) = r.reply;
        let content = match body {
            Some(s) => json!({"application/json": {"schema": s(&mut gen)}}),
            None => json!({"text/plain; version=0.0.4": {"schema": {"type": "string"}}}),
        };
        responses.insert(
            status.to_string(),
            json!({"description": reason(status), "content": content}),
        );
        let mut errors: Vec<u16> = COMMON_ERRORS.iter().chain(r.errors).copied().collect();
        errors.sort_unstable();
        errors.dedup();
        for e in errors {
            responses.insert(
                e.to_string(),
                json!({"description": reason(e),
                       "content": {"application/json": {"schema": error_schema.clone()}}}),
            );
        }
        op.insert("responses".into(), Value::Object(responses));
        let entry = paths
            .entry(r.path.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(m) = entry {
            m.insert(r.method.to_lowercase(), Value::Object(op));
        }
    }
    let schemas: Map<String, Value> = gen.take_definitions(true).into_iter().collect();
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Served as HTTP/JSON on a Unix socket, and optionally over TCP with TLS \
                            and `Authorization: Bearer TOKEN`. Generated from the code \
                            (ferry/src/api/openapi.rs); `GET /v1/openapi.json` returns it."
        },
        "paths": paths,
        "components": {"schemas": schemas},
    })
}

/// The document as committed in the repository (pretty, newline-terminated).
pub fn render(title: &str, routes: &[Route]) -> String {
    let mut s = serde_json::to_string_pretty(&document(title, routes)).expect("a JSON value");
    s.push('\n');
    s
}
