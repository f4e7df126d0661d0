//! How the proxy serves: thread per core, as nginx's worker processes
//! (kv-http's [`kv_http::workers`], shared with kv-node). Each worker has
//! its own single-threaded runtime and its own [`Proxy`], so its own pool of
//! connections to the nodes: a request, its forward to the node and the
//! answer all run on one thread. Connection limits (and the reserve for
//! health probes), timeouts, hyper's answers in the JSON contract and the
//! bounded drain are kv-http's too.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::service::{service_fn, HttpService};
use kv_http::server::Reserve;
use kv_http::workers::{Background, Worker};

use crate::api::{self, Proxy};

/// One worker's proxy.
pub struct ProxyWorker(pub Arc<Proxy>);

impl Worker for ProxyWorker {
    type Body = api::Body;

    fn service(
        &self,
        reserve: Reserve,
    ) -> impl HttpService<
        Incoming,
        ResBody = api::Body,
        Future: Send + 'static,
        Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    > + Send
           + 'static {
        let proxy = Arc::clone(&self.0);
        service_fn(move |request| api::handle(Arc::clone(&proxy), reserve.clone(), request))
    }

    fn background(&self) -> Option<Background> {
        Some(Box::pin(api::evict_idle_forever(Arc::clone(&self.0))))
    }
}
