//! `--server URL`: the same commands through a running engine's HTTP API
//! (`sagaflow_engine::http`), with a blocking HTTP client (no TLS: `http://` only).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use sagaflow_engine::http::dead_letters::DeadLetterPage;
use sagaflow_engine::http::{ActionResponse, StartResponse};
use sagaflow_engine::status::{ListQuery, Page, SagaDetail};
use sagaflow_engine::store::dead_letters::{DeadLetterQuery, DeadLetterRow};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{Action, Format, StartArgs, looks_like_path};

/// A client of one server.
#[derive(Debug)]
pub struct Client {
    /// `http://host:port` (and a path prefix, if the URL had one), without a trailing `/`.
    base: String,
    /// `base` with any password replaced, for messages.
    shown: String,
    agent: ureq::Agent,
}

impl Client {
    /// `http://host:port`, or `host:port` (http is assumed).
    pub fn new(url: &str) -> anyhow::Result<Client> {
        let trimmed = url.trim();
        let url = sagaflow_engine::redact::redact_url(trimmed);
        let rest = if let Some(rest) = trimmed.strip_prefix("http://") {
            rest
        } else if trimmed.starts_with("https://") {
            bail!("--server {url}: https is not supported (this build has no TLS); use http://")
        } else if trimmed.contains("://") {
            bail!("--server {url}: not an http:// URL")
        } else {
            trimmed
        };
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() || rest.starts_with('/') {
            bail!("--server {url}: the URL names no host");
        }
        let base = format!("http://{rest}");
        let shown = sagaflow_engine::redact::redact_url(&base);
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .new_agent();
        Ok(Client { base, shown, agent })
    }

    /// The server's address as messages show it (no password).
    pub fn shown(&self) -> &str {
        &self.shown
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let answer = self.agent.get(format!("{}{path}", self.base)).call();
        self.answer(&format!("{}{path}", self.shown), answer)
    }

    fn post<T: DeserializeOwned>(&self, path: &str, body: Option<&Value>) -> anyhow::Result<T> {
        let request = self.agent.post(format!("{}{path}", self.base));
        let answer = match body {
            Some(b) => request.send_json(b),
            None => request.send_empty(),
        };
        self.answer(&format!("{}{path}", self.shown), answer)
    }

    /// The answer's JSON as `T`; an error answer becomes the server's own message.
    fn answer<T: DeserializeOwned>(
        &self,
        url: &str,
        answer: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<T> {
        let mut response = answer.map_err(|e| {
            let why = sagaflow_engine::redact::redact_in(&e.to_string(), &self.base);
            anyhow!("cannot reach the sagaflow server at {}: {why}", self.shown)
        })?;
        let status = response.status();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| anyhow!("cannot read the answer of {url}: {e}"))?;
        let doc: Option<Value> = serde_json::from_str(&text).ok();
        if !status.is_success() {
            match doc
                .as_ref()
                .and_then(|d| d.get("error"))
                .and_then(Value::as_str)
            {
                Some(message) => {
                    bail!("{message} (HTTP {} from {})", status.as_u16(), self.shown)
                }
                None => bail!(
                    "{url} answered HTTP {} without a sagaflow error (is {} a sagaflow server?): {}",
                    status.as_u16(),
                    self.shown,
                    excerpt(&text)
                ),
            }
        }
        let doc = doc.ok_or_else(|| {
            anyhow!(
                "{url} answered with something that is not JSON (is {} a sagaflow server?): {}",
                self.shown,
                excerpt(&text)
            )
        })?;
        serde_json::from_value(doc)
            .with_context(|| format!("{url} answered JSON this sagaflow does not understand"))
    }

    /// `GET /sagas/{id}`.
    pub fn saga(&self, id: &str) -> anyhow::Result<SagaDetail> {
        self.get(&format!("/sagas/{}", encode(id)))
    }

    /// `GET /sagas?…`.
    pub fn list(&self, q: &ListQuery) -> anyhow::Result<Page> {
        let mut path = format!("/sagas?limit={}", q.limit);
        for (name, value) in [
            ("state", &q.state),
            ("key", &q.sequence_key),
            ("saga", &q.saga),
            ("after", &q.after),
        ] {
            if let Some(v) = value {
                let _ = write!(path, "&{name}={}", encode(v));
            }
        }
        for (name, value) in [("from", q.created_from), ("to", q.created_before)] {
            if let Some(ms) = value {
                let _ = write!(path, "&{name}={ms}");
            }
        }
        self.get(&path)
    }

    /// `GET /sagas/{id}/graph?format=…`: the drawing, as text.
    pub fn graph(&self, id: &str, format: &str) -> anyhow::Result<String> {
        let path = format!("/sagas/{}/graph?format={}", encode(id), encode(format));
        let url = format!("{}{path}", self.shown);
        let answer = self.agent.get(format!("{}{path}", self.base)).call();
        let mut response = answer.map_err(|e| {
            let why = sagaflow_engine::redact::redact_in(&e.to_string(), &self.base);
            anyhow!("cannot reach the sagaflow server at {}: {why}", self.shown)
        })?;
        let status = response.status();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| anyhow!("cannot read the answer of {url}: {e}"))?;
        if !status.is_success() {
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|d| d.get("error").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| excerpt(&text));
            bail!("{message} (HTTP {} from {})", status.as_u16(), self.shown);
        }
        Ok(text)
    }

    /// `GET /dead-letters?…`.
    pub fn dead_letters(&self, q: &DeadLetterQuery) -> anyhow::Result<DeadLetterPage> {
        let mut path = format!("/dead-letters?limit={}", q.limit);
        for (name, value) in [("queue", &q.queue), ("after", &q.after)] {
            if let Some(v) = value {
                let _ = write!(path, "&{name}={}", encode(v));
            }
        }
        self.get(&path)
    }

    /// `GET /dead-letters/{id}`.
    pub fn dead_letter(&self, id: &str) -> anyhow::Result<DeadLetterRow> {
        self.get(&format!("/dead-letters/{}", encode(id)))
    }

    /// `POST path` with a JSON body.
    pub fn post_json<T: DeserializeOwned>(&self, path: &str, body: &Value) -> anyhow::Result<T> {
        self.post(path, Some(body))
    }

    /// `POST /sagas/{id}/{action}`: the saga's state after it, or the server's refusal.
    pub fn act(&self, id: &str, action: &Action) -> anyhow::Result<ActionResponse> {
        let (verb, body) = action.http();
        self.post(&format!("/sagas/{}/{verb}", encode(id)), Some(&body))
    }

    /// `POST /sagas`.
    pub fn start(&self, body: &Value) -> anyhow::Result<StartResponse> {
        self.post("/sagas", Some(body))
    }
}

/// `sagaflow start --server URL`: a file is compiled here for its name and content hash,
/// and the server starts its definition of that name only if it is the same one.
pub fn start(url: &str, args: &StartArgs, input: Value) -> anyhow::Result<ExitCode> {
    let client = Client::new(url)?;
    let path = Path::new(&args.saga);
    let (name, hash) = if path.is_file() {
        let source = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let compiled = sagaflow_dsl::compile(&source);
        let Some(graph) = compiled.graph else {
            let detail = compiled
                .errors()
                .map(|d| format!("line {}: {}", d.span.line, d.message))
                .collect::<Vec<_>>()
                .join("; ");
            bail!(
                "{}: invalid saga definition: {detail} (`sagaflow validate {}` explains)",
                path.display(),
                path.display()
            );
        };
        (
            graph.name().to_owned(),
            Some(graph.content_hash().to_owned()),
        )
    } else if looks_like_path(&args.saga) {
        bail!("cannot read {}: no such file", path.display());
    } else {
        (args.saga.clone(), None)
    };
    let mut body = json!({ "saga": name, "input": input });
    if let Some(k) = &args.idempotency_key {
        body["idempotency_key"] = json!(k);
    }
    if let Some(h) = hash {
        body["definition_hash"] = json!(h);
    }
    let started = client.start(&body)?;
    if args.format == Format::Json {
        let doc = json!({"id": started.id, "existing": started.existing});
        writeln!(std::io::stdout().lock(), "{doc}")?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(std::io::stdout().lock(), "{}", started.id)?;
    if started.existing {
        eprintln!(
            "idempotency key `{}` already started saga {}; nothing new was started",
            args.idempotency_key.as_deref().unwrap_or_default(),
            started.id
        );
    } else {
        eprintln!(
            "saga {} ({} v{}) is {}; the engine at {} delivers its commands",
            started.id,
            started.saga,
            started.version,
            started.state,
            client.shown()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Percent-encodes a path segment or query value (everything but RFC 3986's unreserved).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The start of an unexpected answer, on one line.
fn excerpt(text: &str) -> String {
    let line = super::one_line(text);
    match line.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None if line.is_empty() => "(empty body)".to_owned(),
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_encoding() {
        assert_eq!(encode("a b/c?d&é"), "a%20b%2Fc%3Fd%26%C3%A9");
        assert_eq!(
            Client::new("127.0.0.1:8080/")
                .map(|c| c.base)
                .ok()
                .as_deref(),
            Some("http://127.0.0.1:8080")
        );
        assert!(Client::new("https://x").is_err());
        assert!(Client::new("ftp://x").is_err());
        assert!(Client::new("http://").is_err());
    }
}
