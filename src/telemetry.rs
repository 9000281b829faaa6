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
    // callsite it was last asked about, and applies that to the next event
    // (tokio-rs/tracing#2519, #2704). sqlx asks after every statement, through the `log`
    // facade, and told no it logs nothing: the remembered answer fell on the next event of
    // that thread, which was dropped though the filter admits it (seen:
    // `SAGAFLOW_LOG=sagaflow_engine::apply=debug` printed nothing in an engine process on
    // PostgreSQL). So the logs' filter is the whole subscriber's (with the traces' target added
    // when traces are on, and then a filter of the log layer's own as well, which leaves the
    // trace spans to the traces layer), and the `log` bridge does not pass sqlx's question on.
    // See [`subscriber`] and its tests.
    let traces = provider.as_ref().map(|provider| {
        Box::new(
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("sagaflow"))
                .with_filter(
                    tracing_subscriber::filter::Targets::new()
                        .with_target(sagaflow_engine::trace::TARGET, tracing::Level::INFO),
                ),
        ) as Boxed
    });
    let on = traces.is_some();
    let _ = tracing::subscriber::set_global_default(subscriber(filter, std::io::stderr, traces));
    bridge_log();
    if on {
        sagaflow_engine::trace::set_enabled(true);
    }
    Telemetry { provider }
}

/// Records of the `log` facade (what some dependencies log with) go to tracing, as
/// `SubscriberInitExt::init` would send them, except sqlx's question whether it should log a
/// statement (target `sqlx::query`): answered no here, without asking the subscriber. sqlx logs
/// statements through tracing itself, which still decides. Once per process; a second call
/// does nothing.
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

/// What the subscriber's layers sit on: the registry under the one filter over everything.
type Base =
    tracing_subscriber::layer::Layered<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;
/// A layer over [`Base`] (the traces layer, the log layer).
type Boxed = Box<dyn tracing_subscriber::Layer<Base> + Send + Sync>;

/// The logs (`filter()`'s directives, written to `writer`) and, if given, the traces layer.
/// One filter over the whole subscriber: the logs' directives, plus the traces' target when
/// there are traces; the log layer has a filter of its own only then (see [`init`] for why
/// the whole subscriber's filter matters).
fn subscriber<W>(
    filter: impl Fn() -> tracing_subscriber::EnvFilter,
    writer: W,
    traces: Option<Boxed>,
) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let log = tracing_subscriber::fmt::layer().with_writer(writer);
    let (everything, layers): (_, Vec<Boxed>) = match traces {
        None => (filter(), vec![Box::new(log)]),
        Some(traces) => {
            let everything = match format!("{}=info", sagaflow_engine::trace::TARGET).parse() {
                Ok(directive) => filter().add_directive(directive),
                Err(_) => filter(),
            };
            (
                everything,
                vec![Box::new(log.with_filter(filter())), traces],
            )
        }
    };
    tracing_subscriber::registry().with(everything).with(layers)
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

    /// Questions no event follows, as sqlx asks them (after a statement, target `sqlx::query`,
    /// at debug; for a server notice, `sqlx::postgres::notice`, at info) and another library
    /// might, each followed by a warning, an error and an event of the traces' target; what the
    /// logs and the traces layer (a stand-in writing text) got.
    fn after_questions(directives: &str, traces: bool) -> (String, String) {
        // As `init` does (whichever test comes first installs it, the same way).
        bridge_log_up_to(tracing::level_filters::LevelFilter::TRACE);
        let (logs, traced) = (Captured::default(), Captured::default());
        let (w, t) = (logs.clone(), traced.clone());
        let layer = traces.then(|| {
            Box::new(
                tracing_subscriber::fmt::layer()
                    .with_writer(move || t.clone())
                    .with_filter(
                        tracing_subscriber::filter::Targets::new()
                            .with_target(sagaflow_engine::trace::TARGET, tracing::Level::INFO),
                    ),
            ) as Boxed
        });
        let filter = || tracing_subscriber::EnvFilter::new(directives);
        let dispatch = tracing::Dispatch::new(subscriber(filter, move || w.clone(), layer));
        tracing::dispatcher::with_default(&dispatch, || {
            let questions = [
                ("sqlx::query", log::Level::Debug),
                ("sqlx::postgres::notice", log::Level::Info),
                ("some_library", log::Level::Info),
            ];
            for (target, level) in questions {
                // What sqlx-core's `QueryLogger::finish` does, and its notice handling.
                if log::log_enabled!(target: target, level)
                    || tracing::enabled!(target: "sqlx::query", tracing::Level::DEBUG)
                {
                    tracing::debug!(target: "sqlx::query", "a statement");
                }
                tracing::warn!(target: "sagaflow_engine::apply", "a warning");
                if log::log_enabled!(target: target, level) {
                    tracing::info!(target: "sqlx::postgres::notice", "a notice");
                }
                tracing::error!(target: "sagaflow_engine::relay", "an error");
                tracing::info!(target: sagaflow_engine::trace::TARGET, "a trace event");
            }
        });
        (logs.text(), traced.text())
    }

    /// Each question was followed by a warning and an error, which the filters admit.
    fn logged_as_the_filter_says(logs: &str, directives: &str) {
        for never in ["a statement", "a notice", "a trace event"] {
            assert!(!logs.contains(never), "{directives}: {logs}");
        }
        assert_eq!(logs.matches("a warning").count(), 3, "{directives}: {logs}");
        assert_eq!(logs.matches("an error").count(), 3, "{directives}: {logs}");
    }

    const DIRECTIVES: [&str; 2] = [
        "error,sagaflow_engine::apply=debug",
        "error,sagaflow_engine::apply=info",
    ];

    /// Without traces: nothing a question leaves behind falls on the next event.
    #[test]
    fn an_event_after_an_unanswered_question_is_logged() {
        for directives in DIRECTIVES {
            let (logs, traced) = after_questions(directives, false);
            logged_as_the_filter_says(&logs, directives);
            assert!(traced.is_empty());
        }
    }

    /// With traces on, the log layer has a filter of its own, and the traces layer gets its
    /// target's events all the same.
    #[test]
    fn with_traces_an_event_after_an_unanswered_question_is_logged() {
        for directives in DIRECTIVES {
            let (logs, traced) = after_questions(directives, true);
            logged_as_the_filter_says(&logs, directives);
            assert_eq!(traced.matches("a trace event").count(), 3, "{traced}");
            assert!(!traced.contains("a warning"), "{traced}");
        }
    }
}
