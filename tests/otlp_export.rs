//! OTLP export for real: `sagaflow dev` with `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at a small
//! collector stand-in (an HTTP listener in this test) posts its spans to `/v1/traces` as
//! protobuf, and they hold the saga's spans with their attributes; without the variable it
//! posts nothing.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::{Arc, Mutex};

/// One request the stand-in received.
#[derive(Debug, Clone)]
struct Posted {
    path: String,
    content_type: String,
    body: Vec<u8>,
}

/// Listens on a free port and keeps every request, answering each with 200.
fn collector() -> (String, Arc<Mutex<Vec<Posted>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let keep = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let keep = keep.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                    let (mut length, mut content_type) = (0usize, String::new());
                    loop {
                        let mut header = String::new();
                        if reader.read_line(&mut header).unwrap_or(0) == 0 {
                            return;
                        }
                        let header = header.trim_end();
                        if header.is_empty() {
                            break;
                        }
                        if let Some((name, value)) = header.split_once(':') {
                            match name.trim().to_ascii_lowercase().as_str() {
                                "content-length" => length = value.trim().parse().unwrap_or(0),
                                "content-type" => content_type = value.trim().to_owned(),
                                _ => {}
                            }
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    keep.lock().expect("lock").push(Posted {
                        path,
                        content_type,
                        body,
                    });
                    let _ = reader
                        .get_mut()
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                }
            });
        }
    });
    (url, seen)
}

fn dev(db: &std::path::Path, endpoint: Option<&str>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sagaflow"));
    cmd.args(["dev", "--orders", "3", "--db"]).arg(db);
    cmd.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env_remove("OTEL_SERVICE_NAME");
    if let Some(e) = endpoint {
        cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", e);
    }
    let out = cmd.output().expect("run sagaflow dev");
    assert!(
        out.status.success(),
        "sagaflow dev failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn dev_exports_its_spans_over_otlp_http_when_asked_and_only_then() {
    let dir = std::env::temp_dir().join(format!(
        "sagaflow-otlp-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");

    let (url, seen) = collector();
    dev(&dir.join("with.db"), Some(&url));
    let posted = seen.lock().expect("lock").clone();
    let traces: Vec<&Posted> = posted.iter().filter(|p| p.path == "/v1/traces").collect();
    assert!(!traces.is_empty(), "no POST /v1/traces; got {posted:?}");
    for p in &traces {
        assert_eq!(p.content_type, "application/x-protobuf", "{p:?}");
    }
    let all: Vec<u8> = traces.iter().flat_map(|p| p.body.clone()).collect();
    // Protobuf keeps strings as they are: the service, the span names and their attributes.
    for needle in [
        "sagaflow-dev",
        "dispatch",
        "worker",
        "apply",
        "saga_id",
        "attempt",
    ] {
        assert!(
            contains(&all, needle.as_bytes()),
            "`{needle}` is not in the exported spans"
        );
    }

    let (url, seen) = collector();
    let _ = url;
    dev(&dir.join("without.db"), None);
    assert!(
        seen.lock().expect("lock").is_empty(),
        "spans were posted without an endpoint"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
