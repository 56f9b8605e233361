//! Ending open streams at the shutdown deadline: an SSE body still open when the server
//! raises the signal gets an error event in the client's dialect and ends cleanly, instead
//! of being cut when the process exits. Dropping the body settles its request (limits,
//! usage), as a client disconnect does.

/// Passes responses through; an SSE body still open when `end` is raised gets an error
/// event in the client's dialect and ends there.
pub async fn end_streams_on(
    end: tokio::sync::watch::Receiver<bool>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let anthropic = request.uri().path() == "/v1/messages";
    let response = next.run(request).await;
    let sse = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if !sse {
        return response;
    }
    let (parts, body) = response.into_parts();
    let body = until_ended(body.into_data_stream(), end, shutdown_event(anthropic));
    axum::response::Response::from_parts(parts, axum::body::Body::from_stream(body))
}

/// The error event that ends a stream at the shutdown deadline.
fn shutdown_event(anthropic: bool) -> bytes::Bytes {
    let message = "The gateway is shutting down and ended the stream before it finished.";
    let event = if anthropic {
        format!(
            "event: error\ndata: {}\n\n",
            serde_json::json!({ "type": "error", "error": { "type": "api_error", "message": message } })
        )
    } else {
        format!(
            "data: {}\n\n",
            serde_json::json!({ "error": { "message": message, "type": "server_error", "param": null, "code": "gateway_shutting_down" } })
        )
    };
    bytes::Bytes::from(event)
}

/// `body` until `end` is raised, then `last` and the end of the stream (dropping `body`,
/// which settles its request).
fn until_ended<S, E>(
    body: S,
    mut end: tokio::sync::watch::Receiver<bool>,
    last: bytes::Bytes,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, E>> + Send + 'static
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Send + Unpin + 'static,
    E: Send + 'static,
{
    use futures_util::StreamExt;
    let ended = Box::pin(async move {
        // A dropped sender (the server is gone) ends nothing.
        if end.wait_for(|raised| *raised).await.is_err() {
            std::future::pending::<()>().await;
        }
    });
    futures_util::stream::unfold(Some((body, ended, last)), |state| async move {
        let (mut body, mut ended, last) = state?;
        // The deadline first: a body that always has a chunk ready still ends.
        tokio::select! {
            biased;
            () = &mut ended => Some((Ok(last), None)),
            item = body.next() => item.map(|item| (item, Some((body, ended, last)))),
        }
    })
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    #[tokio::test]
    async fn an_open_stream_ends_with_an_error_event_when_told_and_not_before() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<bytes::Bytes, ()>>();
        let (end, ended) = tokio::sync::watch::channel(false);
        let body = tokio_stream_of(rx);
        let mut out = Box::pin(until_ended(body, ended, shutdown_event(false)));
        tx.send(Ok(bytes::Bytes::from_static(b"data: 1\n\n")))
            .unwrap();
        assert_eq!(out.next().await.unwrap().unwrap(), "data: 1\n\n");
        end.send(true).unwrap();
        let last = out.next().await.unwrap().unwrap();
        assert!(last.starts_with(b"data: {\"error\""));
        assert!(String::from_utf8_lossy(&last).contains("gateway_shutting_down"));
        assert!(
            out.next().await.is_none(),
            "the stream ends after the error event"
        );
        assert!(
            tx.send(Ok(bytes::Bytes::new())).is_err(),
            "the body was dropped"
        );
    }

    #[tokio::test]
    async fn a_stream_that_finishes_first_is_left_alone() {
        let (end, ended) = tokio::sync::watch::channel(false);
        let body = futures_util::stream::iter([Ok::<_, ()>(bytes::Bytes::from_static(
            b"data: [DONE]\n\n",
        ))]);
        let out: Vec<_> = until_ended(body, ended, shutdown_event(true))
            .collect()
            .await;
        assert_eq!(
            out,
            vec![Ok(bytes::Bytes::from_static(b"data: [DONE]\n\n"))]
        );
        drop(end);
    }

    #[test]
    fn anthropic_clients_get_their_error_shape() {
        let event = shutdown_event(true);
        assert!(event.starts_with(b"event: error\ndata: {"));
        assert!(String::from_utf8_lossy(&event).contains("api_error"));
    }

    fn tokio_stream_of<T: Send + 'static>(
        rx: tokio::sync::mpsc::UnboundedReceiver<T>,
    ) -> impl futures_util::Stream<Item = T> + Send + Unpin + 'static {
        Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|v| (v, rx))
        }))
    }
}
