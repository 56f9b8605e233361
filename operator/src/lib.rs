//! `tollgate-operator`: reconciles Provider, RoutePolicy and ApiKey resources into the
//! ConfigMap and Secrets gateways mount, and offers the same compile offline.
#![forbid(unsafe_code)]

pub mod desired;
pub mod keys;
pub mod leader;
pub mod render;
pub mod settings;
pub mod status;
