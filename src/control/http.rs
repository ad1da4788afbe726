//! The read-only HTTP endpoint on `[control] metrics`: `/metrics`, the status page `/`
//! and `/status.json`, on hyper (HTTP/1.1, one request per connection).
//!
//! Nothing here changes anything: drains and the rest stay on the control socket, the
//! one authority. Connections are bounded ([`MAX_SCRAPERS`]), each has
//! [`HEAD_TIMEOUT`] to send its request head and [`CONN_TIMEOUT`] in all.

use std::convert::Infallible;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::sync::Semaphore;

use super::status::{Sampler, Status};
use crate::fd_reserve::FdReserve;
use crate::server::Server;

/// Clients served at once (scrapers, pages, scripts); a connection beyond them is
/// closed at once.
pub const MAX_SCRAPERS: usize = 64;

/// Time a client has to send its request head. A scraper on the same network sends it
/// right after connecting; an idle client holds a slot for at most this long, so idle
/// clients can keep scrapes out only by holding all [`MAX_SCRAPERS`] slots, and then
/// for at most this long after they stop reconnecting.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(1);

/// Time a connection may take in all, request head and response included.
pub const CONN_TIMEOUT: Duration = Duration::from_secs(6);

/// Largest request head read (hyper's buffer; a longer head is refused).
const MAX_HEAD: usize = 8192;

/// The status page: one self-contained file (no external assets).
pub const STATUS_PAGE: &str = include_str!("status_page.html");

/// Serves the endpoint on `listener` until ringlb exits.
pub async fn serve(listener: tokio::net::TcpListener, server: Arc<Server>) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPERS));
    // Scrapes go on when the data plane has used every other descriptor.
    let reserve = Arc::new(FdReserve::new(2));
    let sampler = Arc::new(Mutex::new(Sampler::default()));
    loop {
        let stream = reserve.accept(listener.as_fd(), || listener.accept()).await.0;
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let server = server.clone();
        let reserve = reserve.clone();
        let sampler = sampler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let response = respond(&server, &sampler, &req);
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .keep_alive(false)
                .max_buf_size(MAX_HEAD)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONN_TIMEOUT, conn).await;
            drop(permit);
            reserve.refill();
        });
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// Answers one request.
fn respond(server: &Server, sampler: &Mutex<Sampler>, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "read-only: GET /, /status.json or /metrics\n",
        );
        r.headers_mut().insert("allow", HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            super::metrics::render(server),
        ),
        "/status.json" => {
            let mut r = reply(StatusCode::OK, "application/json", status_json(server, sampler));
            r.headers_mut()
                .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        "/" | "/index.html" => {
            let mut r = reply(StatusCode::OK, "text/html; charset=utf-8", STATUS_PAGE);
            let h = r.headers_mut();
            // The page may load nothing from anywhere: no CDN, works offline.
            h.insert(
                "content-security-policy",
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
                ),
            );
            h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            r
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try GET /, /status.json or /metrics\n",
        ),
    }
}

/// `/status.json`: the status now, with rates from the sampler.
pub fn status_json(server: &Server, sampler: &Mutex<Sampler>) -> String {
    let started = Instant::now();
    let status = {
        let model = server.model.lock();
        Status::collect(&model, server.shared.workers, server.shared.started.elapsed(), started)
    };
    let status = sampler.lock().observe(status, started);
    let text = serde_json::to_string(&status).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    log::debug!(
        "status.json: {} bytes, {} backends, built in {:?}",
        text.len(),
        status.pools.iter().map(|p| p.backends.len()).sum::<usize>(),
        started.elapsed()
    );
    text
}
