//! The emulator's own tests, one binary: its HTTP API (`http_api`), kube-rs clients and
//! watches against it (`kube_rs`), injected cluster lag (`cluster_lag`) and kubelet-style
//! projection (`projection`).

mod cluster_lag;
mod http_api;
mod kube_rs;
mod projection;
