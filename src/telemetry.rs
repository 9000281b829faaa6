//! Logs, and traces when asked for: with `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, sagaflow's trace spans (see
//! `sagaflow_engine::trace`) go to that OTLP/HTTP (protobuf) endpoint beside the usual logs;
//! without it, exactly the plain logs (`SAGAFLOW_LOG`) and no spans are made at all.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;

/// What [`init`] installed; flushes the spans still buffered when dropped.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends what is buffered and stops the exporter (also done on drop).
    pub fn shutdown(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("sagaflow: flushing traces failed: {e}");
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Whether traces are asked for (an OTLP endpoint is set).
pub fn otlp_requested() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()))
}

/// Installs the logs (and the OTLP exporter if asked for); `service` names this process in
/// the traces unless `OTEL_SERVICE_NAME` does.
pub fn init(service: Option<&str>) -> Telemetry {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("SAGAFLOW_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"))
    };
    let provider = match service {
        Some(service) if otlp_requested() => match provider(service) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("sagaflow: traces are off, the OTLP exporter could not be set up: {e}");
                None
            }
        },
        _ => None,
    };
    // A per-layer filter (`with_filter`) remembers, per thread, that it turned down the
    // callsite it was last asked about and applies that to the next event (tokio-rs/tracing#2704).
    // sqlx asks after every statement, through the `log` facade, and told no it logs nothing: the
    // remembered answer fell on the next event of that thread, which was dropped though the
    // filter admits it (seen: `SAGAFLOW_LOG=sagaflow_engine::apply=debug` printed nothing in an
    // engine process on PostgreSQL). So: without traces the filter is the whole subscriber's,
    // not a layer's; and the `log` bridge does not pass sqlx's question on (`bridge_log`), which
    // matters with traces on, whose two layers need filters of their own.
    let Some(provider) = provider else {
        let _ = tracing::subscriber::set_global_default(logs(filter(), std::io::stderr));
        bridge_log();
        return Telemetry::default();
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter());
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("sagaflow"))
        .with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target(sagaflow_engine::trace::TARGET, tracing::Level::INFO),
        );
    let _ = tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(fmt).with(otel),
    );
    bridge_log();
    sagaflow_engine::trace::set_enabled(true);
    Telemetry {
        provider: Some(provider),
    }
}

/// Records of the `log` facade (what some dependencies log with) go to tracing, as
/// `SubscriberInitExt::init` would send them, except sqlx's question whether it should log a
/// statement (target `sqlx::query`): answered no here, so no filter is asked it (see [`init`]).
/// sqlx logs statements through tracing itself, which still decides. Once per process; a second
/// call does nothing.
fn bridge_log() {
    bridge_log_up_to(tracing::level_filters::LevelFilter::current());
}

fn bridge_log_up_to(level: tracing::level_filters::LevelFilter) {
    use tracing_log::AsLog as _;
    let _ = tracing_log::LogTracer::builder()
        .with_max_level(level.as_log())
        .ignore_crate("sqlx::query")
        .init();
}

/// The logs alone: `filter` over the whole subscriber (see [`init`] for why not per layer).
fn logs<W>(
    filter: tracing_subscriber::EnvFilter,
    writer: W,
) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(writer))
}

fn provider(service: &str) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_http_client(UreqClient::new())
        .build()?;
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service.to_owned());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// The exporter's HTTP client: ureq, already in the tree for the CLI, instead of reqwest or
/// tonic. The SDK's batch processor exports from a thread of its own, so a blocking call
/// there holds no async runtime up.
#[derive(Debug)]
struct UreqClient {
    agent: ureq::Agent,
}

impl UreqClient {
    fn new() -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .into();
        UreqClient { agent }
    }
}

#[async_trait::async_trait]
impl HttpClient for UreqClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let request = Request::from_parts(parts, body.to_vec());
        let response = self.agent.run(request)?;
        let (parts, mut body) = response.into_parts();
        let bytes = body.with_config().limit(4 << 20).read_to_vec()?;
        Ok(Response::from_parts(parts, Bytes::from(bytes)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Collects what the logs write.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8_lossy(
                &self
                    .0
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            )
            .into_owned()
        }
    }

    /// What sqlx does after a statement (sqlx-core's `QueryLogger::finish`), asking about
    /// `target`, then a warning and an error; what the logs wrote.
    fn after_a_question(
        target: &'static str,
        subscriber: impl Fn(Captured) -> tracing::Dispatch,
    ) -> String {
        // As `init` does (whichever test comes first installs it, the same way).
        bridge_log_up_to(tracing::level_filters::LevelFilter::TRACE);
        let out = Captured::default();
        tracing::dispatcher::with_default(&subscriber(out.clone()), || {
            for _ in 0..3 {
                if log::log_enabled!(target: target, log::Level::Debug)
                    || tracing::enabled!(target: "sqlx::query", tracing::Level::DEBUG)
                {
                    tracing::debug!(target: "sqlx::query", "a statement");
                }
                tracing::warn!(target: "sagaflow_engine::apply", "a warning");
                tracing::error!(target: "sagaflow_engine::relay", "an error");
            }
        });
        out.text()
    }

    fn logged_as_the_filter_says(text: &str, directives: &str) {
        assert!(!text.contains("a statement"), "{directives}: {text}");
        assert_eq!(text.matches("a warning").count(), 3, "{directives}: {text}");
        assert_eq!(text.matches("an error").count(), 3, "{directives}: {text}");
    }

    /// Without traces: a question no event follows (here another library's, which the `log`
    /// bridge passes on) leaves nothing behind for the next event.
    #[test]
    fn an_event_after_an_unanswered_question_is_logged() {
        for directives in ["warn", "error,sagaflow_engine::apply=debug"] {
            let text = after_a_question("some_library", |out| {
                tracing::Dispatch::new(logs(
                    tracing_subscriber::EnvFilter::new(directives),
                    move || out.clone(),
                ))
            });
            logged_as_the_filter_says(&text, directives);
        }
    }

    /// With traces on, the log layer has a filter of its own (as `init` builds it); sqlx's
    /// question does not reach it, so the next event is logged all the same.
    #[test]
    fn with_a_layer_filter_an_event_after_sqlx_question_is_logged() {
        for directives in ["warn", "error,sagaflow_engine::apply=debug"] {
            let text = after_a_question("sqlx::query", |out| {
                tracing::Dispatch::new(
                    tracing_subscriber::registry().with(
                        tracing_subscriber::fmt::layer()
                            .with_writer(move || out.clone())
                            .with_filter(tracing_subscriber::EnvFilter::new(directives)),
                    ),
                )
            });
            logged_as_the_filter_says(&text, directives);
        }
    }
}
