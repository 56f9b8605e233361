//! The client-facing HTTP/1.1 listener: like `axum::serve`, plus a deadline for request
//! headers (slowloris protection) and graceful draining of open connections.

use std::{future::Future, pin::pin, time::Duration};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::net::TcpListener;

use crate::{client_addr::TrustedProxies, http::ClientAddr};

/// How connections are served.
#[derive(Debug, Clone)]
pub struct Options {
    /// Deadline for a request's headers.
    pub header_timeout: Duration,
    /// Header proxies write the client address chain into (`x-forwarded-for`).
    pub client_address_header: http::HeaderName,
    /// Peers whose header is believed (see [`crate::client_addr`]).
    pub trusted_proxies: std::sync::Arc<TrustedProxies>,
}

/// Serves `router` until `shutdown` completes, then stops accepting and waits for open
/// connections to finish their in-flight requests (the caller bounds that wait). Each
/// request carries its [`ClientAddr`].
pub async fn serve(
    listener: TcpListener,
    router: Router,
    options: Options,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let mut shutdown = pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(options.header_timeout)
            .serve_connection(
                TokioIo::new(stream),
                TowerToHyperService::new(with_client_addr(
                    router.clone(),
                    peer.ip(),
                    options.client_address_header.clone(),
                    options.trusted_proxies.clone(),
                )),
            );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// `router`, with each request's [`ClientAddr`] set from the peer and, when the peer is a
/// trusted proxy, the forwarding `header` ([`crate::client_addr`]).
fn with_client_addr(
    router: Router,
    peer: std::net::IpAddr,
    header: http::HeaderName,
    trusted: std::sync::Arc<TrustedProxies>,
) -> tower::util::MapRequest<
    Router,
    impl Fn(http::Request<hyper::body::Incoming>) -> http::Request<hyper::body::Incoming> + Clone,
> {
    tower::util::MapRequest::new(
        router,
        move |mut req: http::Request<hyper::body::Incoming>| {
            let addr = crate::client_addr::client_addr(
                peer,
                req.headers()
                    .get_all(&header)
                    .iter()
                    .filter_map(|v| v.to_str().ok()),
                &trusted,
            );
            req.extensions_mut().insert(ClientAddr(addr));
            req
        },
    )
}
