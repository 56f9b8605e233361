//! OpenTelemetry tracing: exported over OTLP (HTTP/protobuf or gRPC) only when the
//! standard `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set;
//! otherwise no layer is installed and spans cost what a disabled `tracing` span costs.
//! The SDK reads the other standard variables itself (`OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_HEADERS`, `…_TIMEOUT`,
//! `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_BSP_*`). W3C trace context is accepted from clients
//! and propagated upstream.

use std::time::Duration;

use opentelemetry::{
    Context, Key,
    propagation::TextMapPropagator,
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider},
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// GenAI semantic-convention attribute names (kept here: the semconv crate marks them
/// deprecated-experimental).
pub mod attr {
    /// The upstream provider kind (`openai`, `anthropic`, `azure.ai.openai`, …).
    pub const PROVIDER_NAME: &str = "gen_ai.provider.name";
    /// `chat`, `text_completion`, `embeddings`.
    pub const OPERATION_NAME: &str = "gen_ai.operation.name";
    /// The model the client asked for.
    pub const REQUEST_MODEL: &str = "gen_ai.request.model";
    /// The model that answered.
    pub const RESPONSE_MODEL: &str = "gen_ai.response.model";
    /// Input tokens.
    pub const INPUT_TOKENS: &str = "gen_ai.usage.input_tokens";
    /// Output tokens.
    pub const OUTPUT_TOKENS: &str = "gen_ai.usage.output_tokens";
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Whether the environment asks for trace export.
pub fn enabled() -> bool {
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
    {
        return false;
    }
    env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        || env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
}

/// The resource: `OTEL_SERVICE_NAME`/`OTEL_RESOURCE_ATTRIBUTES` when given, else
/// `service.name=<default>`, and the version.
fn resource(default_service: &'static str) -> Resource {
    let from_env = Resource::builder().build();
    let unnamed = from_env
        .get(&Key::from_static_str("service.name"))
        .is_none_or(|v| v.as_str().starts_with("unknown_service"));
    let mut builder = Resource::builder().with_attribute(opentelemetry::KeyValue::new(
        "service.version",
        env!("CARGO_PKG_VERSION"),
    ));
    if unnamed {
        builder = builder.with_service_name(default_service);
    }
    builder.build()
}

/// Builds the tracer provider when the environment asks for it. Call inside the tokio
/// runtime: the HTTP exporter sends on it and the gRPC channel is bound to it.
pub fn provider(default_service: &'static str) -> anyhow::Result<Option<SdkTracerProvider>> {
    if !enabled() {
        return Ok(None);
    }
    let protocol =
        env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"));
    let exporter = match protocol.as_deref().map(str::trim) {
        None | Some("http/protobuf") => {
            let timeout = env("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
                .or_else(|| env("OTEL_EXPORTER_OTLP_TIMEOUT"))
                .and_then(|v| v.trim().parse().ok())
                .map_or(Duration::from_secs(10), Duration::from_millis);
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_http_client(TokioHttpClient::new(timeout)?)
                .build()?
        }
        Some("grpc") => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()?,
        Some(other) => anyhow::bail!(
            "OTEL_EXPORTER_OTLP_PROTOCOL {other:?} is not supported (use http/protobuf or grpc)"
        ),
    };
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(BatchConfigBuilder::default().build())
        .build();
    Ok(Some(
        SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource(default_service))
            .build(),
    ))
}

/// The tracing layer that turns our spans into OpenTelemetry spans.
pub fn layer<S>(
    provider: &SdkTracerProvider,
    crate_name: &'static str,
) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer as _;
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(crate_name))
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_target(false)
        .with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target(crate_name, tracing::Level::INFO),
        )
}

/// Flushes and stops the exporter (on a blocking thread: the export itself runs on the
/// runtime).
pub async fn shutdown(provider: SdkTracerProvider) {
    let result =
        tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(Duration::from_secs(5)))
            .await;
    if let Ok(Err(e)) = result {
        tracing::warn!(error = %e, "flushing traces on shutdown failed");
    }
}

/// The caller's W3C trace context (`traceparent`, `tracestate`), empty if absent.
pub fn extract(headers: &http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Adds the trace context for an upstream call: the span's own when tracing is on, else
/// the caller's unchanged (so traces stay connected through a gateway that exports none).
pub fn inject(span: &tracing::Span, incoming: &Context, headers: &mut http::HeaderMap) {
    let cx = span.context();
    let cx = if cx.span().span_context().is_valid() {
        cx
    } else {
        incoming.clone()
    };
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

/// The trace id to log: this span's when exported, else the caller's.
pub fn trace_id(span: &tracing::Span, incoming: &Context) -> Option<String> {
    let own = span.context();
    let sc = own.span().span_context().clone();
    if sc.is_valid() {
        return Some(sc.trace_id().to_string());
    }
    let sc = incoming.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// OTLP/HTTP transport for the SDK's batch processor, which runs on its own thread: each
/// export is sent on the tokio runtime the client was built in.
#[derive(Debug, Clone)]
struct TokioHttpClient {
    client: reqwest::Client,
    handle: tokio::runtime::Handle,
}

impl TokioHttpClient {
    fn new(timeout: Duration) -> anyhow::Result<Self> {
        Ok(Self {
            client: reqwest::Client::builder().timeout(timeout).build()?,
            handle: tokio::runtime::Handle::try_current()
                .map_err(|_| anyhow::anyhow!("the trace exporter needs the tokio runtime"))?,
        })
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for TokioHttpClient {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<
        opentelemetry_http::Response<opentelemetry_http::Bytes>,
        opentelemetry_http::HttpError,
    > {
        let client = self.client.clone();
        self.handle
            .spawn(
                async move { opentelemetry_http::HttpClient::send_bytes(&client, request).await },
            )
            .await?
    }
}

/// Installs logging (JSON lines when `json`, else text; level from `RUST_LOG`, default
/// `info`) and, with a provider, the span export of `crate_name`'s spans. Log lines take
/// events only: spans exist for traces, so with no exporter nothing subscribes to them
/// and they cost next to nothing on the request path.
pub fn init(json: bool, provider: Option<&SdkTracerProvider>, crate_name: &'static str) {
    use std::io::IsTerminal;

    use tracing_subscriber::{
        EnvFilter, Layer as _,
        filter::{FilterExt, filter_fn},
        layer::SubscriberExt,
        util::SubscriberInitExt,
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .and(filter_fn(|meta| meta.is_event()));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let fmt = if json {
        fmt.json()
            .flatten_event(true)
            .with_current_span(false)
            .with_filter(filter)
            .boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    match provider {
        Some(p) => tracing_subscriber::registry()
            .with(fmt)
            .with(layer(p, crate_name))
            .init(),
        // No `Option` layer here: even a `None` one would make the registry record
        // every span.
        None => tracing_subscriber::registry().with(fmt).init(),
    }
}
